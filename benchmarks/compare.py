"""The comparison table in one command: dense MHA, MoH, GoH, SMoE, fine-grained SMoE, MH-MoE and
GoH-MoE at matched total parameters, same tokens, seeds and schedule (logic: gohgraph/experiments/).

    python benchmarks/compare.py --quick --out benchmarks/results     # < 10 min on 2 CPU cores
    python benchmarks/compare.py --out benchmarks/results/full        # the full setting: 43 min on 2 CPU cores

Same arguments as ``gohgraph bench``.
"""

from __future__ import annotations

import argparse
import sys

from gohgraph.cli import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
