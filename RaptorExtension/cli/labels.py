"""``raptor labels``: the labels of a MedMNIST-style ``.npz`` as the labels CSV ``raptor probe fit`` takes.

Examples::

    raptor labels adrenalmnist3d_64.npz -o labels.csv                 # id,split,label for every volume
    raptor labels organmnist3d.npz#train[0:100] --column organ -o l.csv

The ids are those ``raptor embed file.npz`` gives the volumes (``test_17``), so
the two files join without a line of Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("labels", help="write the labels of a MedMNIST-style .npz as a labels CSV (id,split,label...)",
                       description="Write the labels of a MedMNIST-style .npz ({train,val,test}_labels) as the "
                                   "id,split,label CSV that `raptor probe fit` takes, with the ids `raptor embed` gives.")
    p.add_argument("npz", help="file.npz, or file.npz#test, #test_17, #train[0:100] for part of it")
    p.add_argument("-o", "--output", default=None, help="the labels CSV (default: print to standard output)")
    p.add_argument("--column", default="label",
                   help="name of the label column (default label; several labels per volume: label_0, label_1, ...)")
    p.set_defaults(func=run_labels)


def run_labels(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..embeddings.csv_format import csv_line
    from ..volumes.arrays import medmnist_labels

    spec, selector = args.npz, None
    if "#" in spec and not Path(spec).exists():
        spec, selector = spec.split("#", 1)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not args.column or args.column in ("id", "split") or "," in args.column:
        raise InputError(f"--column {args.column!r}: a label column needs a name other than id and split, without commas")
    header, rows = medmnist_labels(path, selector, args.column)
    text = csv_line(header) + "".join(csv_line(row) for row in rows)
    if args.output:
        atomic_write_text(args.output, text)
        counts = {}
        for row in rows:
            counts[row[1]] = counts.get(row[1], 0) + 1
        per_split = ", ".join(f"{split} {n}" for split, n in counts.items())
        print(f"raptor: wrote {len(rows)} labels ({per_split}) -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


__all__ = ["add_parser", "run_labels"]
