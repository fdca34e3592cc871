use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

struct Table {
    routes: RwLock<HashMap<String, u32>>,
    queue: Mutex<Vec<u32>>,
}

impl Table {
    // The outage: read guard alive for the whole if-let body, write inside.
    fn bad_if_let(&self, host: &str) {
        // ruleid: rust-if-let-lock-guard
        if let Some(n) = self.routes.read().unwrap().get(host) {
            self.routes.write().unwrap().insert(host.to_string(), n + 1);
        }
    }

    fn bad_if_let_else(&self, host: &str) -> u32 {
        // ruleid: rust-if-let-lock-guard
        if let Some(n) = self.routes.read().unwrap().get(host).copied() {
            n
        } else {
            self.routes.write().unwrap().insert(host.to_string(), 0);
            0
        }
    }

    // parking_lot style: no unwrap.
    fn bad_if_let_parking_lot(&self, routes: &parking_lot::RwLock<HashMap<String, u32>>, host: &str) {
        // ruleid: rust-if-let-lock-guard
        if let Some(_n) = routes.read().get(host) {
            routes.write().remove(host);
        }
    }

    fn bad_match(&self, host: &str) -> u32 {
        // ruleid: rust-match-lock-guard
        match self.routes.read().unwrap().get(host) {
            Some(n) => *n,
            None => {
                self.routes.write().unwrap().insert(host.to_string(), 1);
                1
            }
        }
    }

    fn bad_match_mutex(&self) -> u32 {
        // ruleid: rust-match-lock-guard
        match self.queue.lock().unwrap().pop() {
            Some(n) => n,
            None => 0,
        }
    }

    fn bad_while_let(&self) {
        // ruleid: rust-while-let-lock-guard
        while let Some(n) = self.queue.lock().unwrap().pop() {
            self.queue.lock().unwrap().push(n / 2);
        }
    }

    fn bad_try_lock(&self) {
        // ruleid: rust-if-let-lock-guard
        if let Ok(mut q) = self.queue.try_lock() {
            q.push(1);
        }
    }

    // ---- fine: the guard is dropped at the end of its own statement ----

    fn ok_if_let_local(&self, host: &str) {
        let found = self.routes.read().unwrap().get(host).copied();
        // ok: rust-if-let-lock-guard
        if let Some(n) = found {
            self.routes.write().unwrap().insert(host.to_string(), n + 1);
        }
    }

    fn ok_plain_if(&self, host: &str) {
        // A plain `if` condition drops its temporaries before the body runs.
        // ok: rust-if-let-lock-guard
        if self.routes.read().unwrap().contains_key(host) {
            self.routes.write().unwrap().remove(host);
        }
    }

    fn ok_match_local(&self, host: &str) -> u32 {
        let found = self.routes.read().unwrap().get(host).copied();
        // ok: rust-match-lock-guard
        match found {
            Some(n) => n,
            None => 0,
        }
    }

    fn ok_loop(&self) {
        loop {
            let next = self.queue.lock().unwrap().pop();
            // ok: rust-while-let-lock-guard
            while let Some(n) = next {
                let _ = n;
                break;
            }
            if next.is_none() {
                break;
            }
        }
    }

    fn ok_if_let_no_lock(&self, map: &HashMap<String, u32>, host: &str) {
        // ok: rust-if-let-lock-guard
        if let Some(n) = map.get(host) {
            let _ = n;
        }
    }

    fn ok_io_read(&self, f: &mut std::fs::File, buf: &mut [u8]) {
        use std::io::Read;
        // A `read` with arguments is I/O, not a lock.
        // ok: rust-if-let-lock-guard
        if let Ok(n) = f.read(buf) {
            let _ = n;
        }
    }

    fn ok_lock_in_arm_only(&self, k: Option<u32>) {
        // The lock is taken in an arm, not in the scrutinee: nothing is held across the match.
        // ok: rust-match-lock-guard
        match k {
            Some(n) => self.queue.lock().unwrap().push(n),
            None => {}
        }
    }

    fn ok_lock_in_if_let_body_only(&self, k: Option<u32>) {
        // ok: rust-if-let-lock-guard
        if let Some(n) = k {
            self.queue.lock().unwrap().push(n);
        }
    }
}
