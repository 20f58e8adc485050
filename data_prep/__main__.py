"""Command line: build a mixture, or check a data file.

  python -m data_prep build recipes/data/tiny.yaml [--output-dir DIR]
  python -m data_prep check FILE --kind conversations|preferences|rl_prompts [--format auto]
"""

import argparse
import logging
import sys

from .errors import SkipReport
from .mixture import Builder, load_spec, render_report
from .readers import FORMATS, load
from .schema import KINDS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the mixture a YAML spec describes")
    build.add_argument("spec")
    build.add_argument("--output-dir")
    check = sub.add_parser("check", help="load a file, skipping bad rows, and print what was skipped and why")
    check.add_argument("path")
    check.add_argument("--kind", choices=KINDS, default="conversations")
    check.add_argument("--format", choices=("auto", *FORMATS), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "build":
        result = Builder(load_spec(args.spec), args.output_dir).build()
        print(render_report(result["report"]))
        return 0
    report = SkipReport(args.path)
    data = load(args.path, kind=args.kind, format=args.format, on_error="skip", report=report)
    print(report.summary())
    print(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
