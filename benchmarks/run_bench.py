"""Run `pidrt bench` without the pidrt entry point (same arguments; see benchmarks/README.md).

    python benchmarks/run_bench.py --preset tiny --steps 10 --iterations 3 --threads 2
"""

import sys

from pidrt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
