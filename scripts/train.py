"""`accelerate launch scripts/train.py CONFIG.yaml [--field value ...]`: `ddl train`, one process per device."""

import sys

from ddl_hf_launch import apply_cpu_defaults

if __name__ == "__main__":
    apply_cpu_defaults()  # before torch is imported: OpenMP waiting and threads of the `ddl` commands
    from ddl_hf.train import main

    sys.exit(main(sys.argv[1:]))
