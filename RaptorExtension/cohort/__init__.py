"""Cohorts: a whole DICOM database, folder tree or manifest embedded into one table, resumable and sharded.

- :mod:`.job`: the job as plain data, its progress and summary;
- :mod:`.sources`, :mod:`.dicomdb`: finding series (folders, manifests, a Slicer DICOM database);
- :mod:`.plan`: filters, stable ids, shards; :mod:`.anonymize`: salted ids and UIDs;
- :mod:`.run`: :func:`~.run.run_batch`; :mod:`.rows` and :mod:`.workers`: rows, the writer thread, one process per GPU;
- :mod:`.record`, :mod:`.merge`, :mod:`.errorlog`: the record beside each output, ``raptor merge``, the errors CSV.

The names a script needs are importable from here::

    from RaptorExtension.cohort import BatchJob, BatchSources, SeriesFilter, discover_slicer_database, run_batch
"""

from .dicomdb import discover_slicer_database
from .job import BatchJob, BatchProgress, BatchSources, BatchSummary
from .merge import merge_parts
from .run import run_batch
from .sources import SeriesFilter

__all__ = [
    "BatchJob",
    "BatchProgress",
    "BatchSources",
    "BatchSummary",
    "SeriesFilter",
    "discover_slicer_database",
    "merge_parts",
    "run_batch",
]
