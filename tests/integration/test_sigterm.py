"""SIGTERM ends a node within its grace period whatever its compute thread is doing (docs/architecture.md §11).

A real process serves the way drafters and verifiers do (serving.server.serve, a ModelNode) while its
compute thread is stuck in a call that never returns, the worst a model call can do.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 1.0

WEDGED_NODE = textwrap.dedent(
    f"""
    import asyncio, signal, threading
    from serving.node import ModelNode
    from serving.server import serve

    async def main():
        node = ModelNode("wedged", session_idle_s=0)
        tasks = []  # held: the loop keeps only weak references to tasks

        async def wedged():
            # Once serve() handles SIGTERM and the compute thread is stuck: the test may signal.
            while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not node.stalled(0.0):
                await asyncio.sleep(0.01)
            print("wedged", flush=True)

        async def warmup():
            # A call that never returns holds the compute thread, as a runaway model call would.
            loop = asyncio.get_running_loop()
            tasks.extend([loop.create_task(node.run(threading.Event().wait, op="wedge")), loop.create_task(wedged())])

        stalled = lambda: node.stalled(1)
        await serve("wedged", "127.0.0.1:0", lambda server: [], warmup, grace_s={GRACE_S}, stalled=stalled)
        node.shutdown()

    asyncio.run(main())
    """
)


def test_sigterm_ends_a_node_whose_compute_thread_is_wedged():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen([sys.executable, "-c", WEDGED_NODE], cwd=ROOT, env=env, **pipes)
    try:
        assert process.stdout.readline().strip() == "wedged", process.stderr.read()
        process.send_signal(signal.SIGTERM)
        # The grace period plus interpreter shutdown; a process that waited for the wedged call never ends.
        returncode = process.wait(timeout=GRACE_S + 30)
    finally:
        process.kill()
        process.wait()
    assert returncode == 0, process.stderr.read()
