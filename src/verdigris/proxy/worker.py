"""``verdigris proxy``: a supervisor process and N worker processes sharing the port (SO_REUSEPORT).

Each worker runs uvloop, its own routing table fed by the local agent, its own upstream pools and load
counts. The supervisor restarts a worker that dies (at most 5 times a minute, then gives up with exit
status 1) and on SIGTERM / SIGINT passes SIGTERM on: every worker stops accepting, drains its in-flight
requests for at most ``timeouts.drain`` seconds and exits; stragglers are killed after that.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from verdigris.proxy.config import ProxyConfig

log = logging.getLogger("verdigris.proxy")

RESTART_BUDGET = 5
RESTART_WINDOW = 60.0


def worker_main(config: ProxyConfig, index: int) -> None:
    """The entry point of a worker process."""
    import uvloop

    from verdigris.proxy.server import serve

    logging.basicConfig(level=logging.WARNING, format=f"proxy[{index}] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await serve(config, stop=stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(main())
    sys.exit(code)


def run_proxy(config: ProxyConfig) -> int:
    """Supervise ``config.workers`` workers until SIGTERM / SIGINT. Returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="proxy %(levelname)s: %(message)s")
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(i: int) -> BaseProcess:
        p = ctx.Process(target=worker_main, args=(config, i), name=f"verdigris-proxy-{i}", daemon=False)
        p.start()
        return p

    procs: list[BaseProcess] = [start(i) for i in range(config.workers)]
    log.info("listening on %s with %d workers (agent %s)", config.listen, config.workers, config.agent)
    restarts: list[float] = []
    status = 0
    while not stopping:
        time.sleep(0.1)
        for i, p in enumerate(procs):
            if p.is_alive() or stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if p.exitcode == 1 or len(restarts) > RESTART_BUDGET:
                log.error("worker %d exited with status %s; stopping", i, p.exitcode)
                stopping, status = True, 1
                break
            log.warning("worker %d exited with status %s; restarting it", i, p.exitcode)
            procs[i] = start(i)
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: drain and exit
    deadline = time.monotonic() + config.timeouts.drain + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5.0)
    return status


__all__ = ["run_proxy", "worker_main"]
