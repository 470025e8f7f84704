"""The dedicated thread pools (L{sidero.threads})."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from sidero.threads import CallTimeout, ThreadPoolService, run_in_pool
from tests.paths import REPO, tree_env


class ThreadPoolServiceTests(TestCase):
    async def test_runs_off_the_reactor_thread(self) -> None:
        """C{run} calls the function in one of the pool's own threads."""
        import threading

        pool = ThreadPoolService(reactor, "test", max_threads=2)
        pool.startService()
        self.addCleanup(pool.stopService)
        name = await pool.run(lambda: threading.current_thread().name)
        self.assertIn("sidero-test", name)
        self.assertNotEqual(name, threading.current_thread().name)

    async def test_deadline(self) -> None:
        """A call past its deadline fails with CallTimeout; the pool stays usable."""
        import threading

        release = threading.Event()
        pool = ThreadPoolService(reactor, "test", max_threads=2)
        pool.startService()
        self.addCleanup(pool.stopService)
        self.addCleanup(release.set)
        with self.assertRaises(CallTimeout):
            await run_in_pool(reactor, pool.pool, 0.2, "stuck", release.wait)
        self.assertEqual(await pool.run(lambda: 42), 42)

    def test_a_stuck_worker_does_not_hold_the_process(self) -> None:
        """A worker blocked forever (a BMC that never answers) does not keep the interpreter
        from exiting when the pool was never stopped (the hang seen at the end of test runs)."""
        program = textwrap.dedent("""
            import threading, time
            from twisted.internet.task import Clock
            from sidero.threads import ThreadPoolService
            class R(Clock):
                def callFromThread(self, f, *a, **kw): pass
                def getThreadPool(self): raise AssertionError
            pool = ThreadPoolService(R(), "stuck", max_threads=1)
            pool.startService()
            pool.pool.callInThread(threading.Event().wait)
            time.sleep(0.2)
            print("leaving", flush=True)
        """)
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                              timeout=30, cwd=REPO, env=tree_env())
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "leaving"), done.stderr)
