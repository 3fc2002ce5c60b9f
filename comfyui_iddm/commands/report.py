"""`iddm report REPORT.json [--out DIR] [--overwrite]`: (re)build the HTML privacy report from a JSON report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="build the HTML privacy report from a JSON report",
        description="Writes report.html (self-contained: plots embedded) and the PNG plots beside it "
                    "from the JSON report that `iddm train --report` or `iddm demo` wrote. The photo "
                    "strip is not part of a JSON report, so it is not shown.")
    p.add_argument("report", type=Path, help="the JSON report")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the JSON's folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report.html and plots there (refused otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import check_html_output, write_report_html

    if not args.report.is_file():
        raise FileNotFoundError(f"{args.report} does not exist; give the JSON report written by "
                                "`iddm train --report FILE.json` or `iddm demo` (DIR/report.json).")
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.report} is not a JSON report ({err}); give the file written by "
                         "`iddm train --report` or `iddm demo`.") from None
    if not isinstance(report, dict) or "config" not in report:
        raise ValueError(f"{args.report} is not an IDDM report (it has no 'config'); give the file "
                         "written by `iddm train --report` or `iddm demo`.")
    out = args.out or args.report.parent
    check_html_output(out, args.overwrite)
    path = write_report_html(report, out)
    print(f"report written: {path}")
    return 0
