"""One lock around the launches of autotuned Triton kernels.

``triton.runtime.Autotuner`` keeps per-call state on the shared kernel object
(``self.nargs``) while it benchmarks a new key, and clears it afterwards; a second
thread launching the same kernel meanwhile fails with "'NoneType' object is not a
mapping" (seen on an H200 with triton 3.6: tests/test_gpu_safety.py,
test_two_threads_first_call). Launches are host-side and asynchronous, so holding
the lock costs one uncontended acquire per call once the key is tuned.
"""

import threading

AUTOTUNE_LOCK = threading.RLock()
