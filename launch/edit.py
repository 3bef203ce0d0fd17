"""The one entry every launcher starts: ``locft edit`` with the arguments it was given.

    python launch/edit.py --config run.yaml train.lr=1e-4                       # one process
    torchrun --nproc_per_node 8 launch/edit.py --config run.yaml                # FSDP2, one node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD:29500 --rdzv_id $JOB launch/edit.py --config run.yaml

Exit codes: 0 done, 2 bad input (message on stderr), 75 preempted after saving a checkpoint (rerun the
same command to resume).
"""

import sys

from locft_dist.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "edit", *sys.argv[1:]]
    sys.exit(main())
