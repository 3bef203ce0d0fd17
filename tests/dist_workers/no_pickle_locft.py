"""``locft`` with ``pickle.load``/``pickle.loads`` replaced by functions that raise: nothing a run reads may
be unpickled (checkpoints included). Launch it as a script, e.g. ``torchrun --nproc_per_node 2
tests/dist_workers/no_pickle_locft.py edit ...``; a call to either prints ``UNPICKLED`` and fails the run.
"""

import pickle
import sys
import traceback


def _refuse(*args, **kwargs):
    stack = "".join(traceback.format_stack(limit=8))
    print(f"UNPICKLED: pickle.load/loads called\n{stack}", file=sys.stderr, flush=True)
    raise RuntimeError("pickle.load/loads called while running locft")


pickle.load = _refuse
pickle.loads = _refuse

from locft_dist.cli import main  # noqa: E402  (after the patch, so nothing imported can keep the originals)

if __name__ == "__main__":
    sys.exit(main())
