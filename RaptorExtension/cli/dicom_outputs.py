"""DICOM results on the command line: ``probe apply --dicom-sr``, ``explain --dicom-pm/--dicom-sr``, ``--stow``.

The glue between the result objects (:mod:`..probes.dicom_results`) and where
a series lives: a DICOM folder (the files' headers) or a DICOMweb server (the
series' metadata, WADO-RS), and where results go (files; STOW-RS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError, RaptorError


def add_stow_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stow", nargs="?", const="", default=None, metavar="URL",
                        help="also send the DICOM results to a DICOMweb server (STOW-RS): URL, or without a value the "
                             "server the series came from")


def source_of(where: str, series_uid: str, args: argparse.Namespace):
    """(SourceSeries, DicomWebAccess or None) for a series named by a folder or a DICOMweb series URL."""
    from ..cohort.dicomweb import is_series_url, parse_series_url, series_metadata
    from ..probes.dicom_results import read_source_folder, source_series
    from .options import dicomweb_access

    if not where:
        raise InputError("records no source (an anonymized table?); there is no DICOM series to reference")
    if is_series_url(where):
        root, study_uid, url_series = parse_series_url(where)
        access = dicomweb_access(args, root)
        datasets = series_metadata(access, study_uid, url_series)
        return source_series(datasets, where, series_uid or url_series), access
    path = Path(where.split("|")[0])
    if not path.exists():
        raise InputError(f"{where}: no such DICOM folder; there is no series to reference")
    if path.is_file() and not _is_dicom(path):
        raise InputError(f"{where}: is not a DICOM series (results in DICOM need one to reference; this is a "
                         f"{''.join(path.suffixes) or 'plain'} file)")
    return read_source_folder(where, series_uid or None), None


def _is_dicom(path: Path) -> bool:
    from ..volumes.dicom import is_dicom_file

    return path.suffix.lower() == ".dcm" or is_dicom_file(path)


def stow_target(args: argparse.Namespace, came_from):
    """The DICOMweb access to store results with, or None when --stow was not given."""
    from .options import dicomweb_access

    if args.stow is None:
        return None
    if args.stow:
        return dicomweb_access(args, args.stow)
    if came_from is None:
        raise RaptorError("--stow without a URL sends results to the server the series came from; these came from "
                          "files: give --stow URL")
    return came_from


def write_score_reports(args: argparse.Namespace, probe, scores) -> int:
    """One SR per scored embedding into ``args.dicom_sr``; failures are one line each.  Returns the exit code."""
    from ..cohort.dicomweb import store
    from ..probes.dicom_results import embedding_origins, require_highdicom, result_file_name, score_report, write_dicom

    require_highdicom()
    out_dir = Path(args.dicom_sr)
    origins = embedding_origins(args.embeddings)
    written, failed, stowed = [], 0, 0
    for n, identifier in enumerate(scores.ids):
        origin = origins.get(identifier, {"source": "", "series_uid": ""})
        try:
            source, came_from = source_of(origin["source"], origin["series_uid"], args)
            sr = score_report(source, probe, scores.scores[n])
            path = write_dicom(sr, out_dir / result_file_name(identifier, "sr"))
            written.append(path)
            target = stow_target(args, came_from)
            if target is not None:
                stowed += store(target, [sr])
        except RaptorError as exc:
            failed += 1
            print(f"raptor: error: {identifier}: {exc}", file=sys.stderr)
    stow_note = f", {stowed} stored with STOW-RS" if args.stow is not None else ""
    print(f"raptor: wrote {len(written)} DICOM SR(s) to {out_dir}{stow_note}" + (f"; {failed} failed" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def check_explain_source(args: argparse.Namespace):
    """Before any slice is encoded: the explained volume's DICOM series, or a clear error; (None, None) if not asked."""
    if not (args.dicom_pm or args.dicom_sr):
        return None, None
    from ..probes.dicom_results import require_highdicom

    require_highdicom()
    source, came_from = source_of(args.volume, "", args)
    return source, came_from


def write_explain_results(args: argparse.Namespace, probe, scores, explanation, source, came_from) -> list[str]:
    """The Parametric Map and/or SR of an explanation (and STOW-RS); returns the files written."""
    from ..cohort.dicomweb import store
    from ..probes.dicom_results import parametric_map, score_report, write_dicom

    written, objects = [], []
    if args.dicom_pm:
        pm = parametric_map(source, probe, explanation)
        write_dicom(pm, args.dicom_pm)
        written.append(args.dicom_pm)
        objects.append(pm)
    if args.dicom_sr:
        sr = score_report(source, probe, scores, explanation=explanation)
        write_dicom(sr, args.dicom_sr)
        written.append(args.dicom_sr)
        objects.append(sr)
    target = stow_target(args, came_from)
    if target is not None:
        count = store(target, objects)
        print(f"raptor: stored {count} DICOM object(s) on {target.url} (STOW-RS)", file=sys.stderr)
    return written


__all__ = ["add_stow_option", "source_of", "stow_target", "write_score_reports", "check_explain_source",
           "write_explain_results"]
