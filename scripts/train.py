"""`accelerate launch scripts/train.py CONFIG.yaml [--field value ...]`: `ddl train`, one process per device."""

import sys

from ddl_hf.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
