# Put on PYTHONPATH of engine replicas only: every Python child they spawn (vLLM's
# engine core and its workers) dies with its parent, so a replica killed by Ray or by
# a chaos test never leaves an orphan engine holding cores, KV memory and ports.
import os

if os.environ.get("PDSERVE_DIE_WITH_PARENT") == "1":
    try:
        import ctypes
        import signal

        _PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() == 1:
            os._exit(1)
    except OSError:
        pass
