"""``raptor merge``: the shards of one job into one table, only when they add up to the planned cohort."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write, atomic_write_text
from ..embeddings.csv_format import csv_line
from ..embeddings.settings import check_compatible
from ..embeddings.stream import index_table, read_line_at
from ..errors import InputError, MetadataMismatch, RaptorError
from ..outputs import check_outputs
from .errorlog import COLUMNS as ERROR_COLUMNS
from .job import errors_path_for, record_path_for
from .plan import cohort_digest
from .record import errors_path_for_record, read_errors, read_record
from .sources import shard_of


@dataclass
class MergeSummary:
    output: Path
    rows: int
    failed: int
    parts: int
    errors_csv: Path | None


def merge_parts(parts: Sequence[str | Path], output: str | Path) -> MergeSummary:
    """Combine the CSVs of all shards of one job into ``output``, rows sorted by id.

    Refused, with the reason, when the parts do not share the embedding
    settings, the cohort, the shard count or the anonymization salt, when a
    shard is missing or given twice, when a row is not in its shard's plan or
    appears in two parts, or when a series of the plan is neither in its
    part nor in that part's errors CSV (the shard did not finish: rerun it).
    Series that failed are listed in ``OUTPUT_errors.csv``.
    """
    output = Path(output)
    if not parts:
        raise RaptorError("merge needs the part CSVs of every shard")
    records = []
    for part in parts:
        part = Path(part)
        if not part.exists():
            raise InputError(f"{part}: no such file")
        record = read_record(record_path_for(part))
        if record is None:
            raise InputError(f"{part}: no batch record {record_path_for(part).name} beside it (was it written by raptor batch?)")
        records.append((part, record))
    inputs = []
    for part, record in records:
        inputs += [("a part", part), ("a part's batch record", record_path_for(part)),
                   ("a part's errors CSV", errors_path_for_record(part, record))]
    check_outputs([("-o/--output", output), ("the merged errors CSV", errors_path_for(output)),
                   ("the merged batch record", record_path_for(output))], inputs)
    first_part, first = records[0]
    count = int(first["shard"][1])
    seen_shards: dict[int, Path] = {}
    for part, record in records:
        check_compatible(first["settings"], record["settings"], f"{part} vs {first_part}")
        if int(record["shard"][1]) != count:
            raise RaptorError(f"{part}: is shard {record['shard'][0]}/{record['shard'][1]}, {first_part} one of {count}")
        # The salt first: another salt gives other ids, so the cohort check would blame the sources.
        if bool(record.get("anonymized")) != bool(first.get("anonymized")) or record.get("salt_check") != first.get("salt_check"):
            raise RaptorError(f"{part}: anonymization (or its salt) differs from {first_part}")
        if record["cohort_sha256"] != first["cohort_sha256"]:
            raise RaptorError(f"{part}: was planned from another cohort than {first_part} (sources or filters differ)")
        index = int(record["shard"][0])
        if index in seen_shards:
            raise RaptorError(f"shard {index}/{count} is given twice: {seen_shards[index]} and {part}")
        seen_shards[index] = part
    missing_shards = [i for i in range(count) if i not in seen_shards]
    if missing_shards:
        raise RaptorError(f"shard{'s' if len(missing_shards) > 1 else ''} {', '.join(f'{i}/{count}' for i in missing_shards)} missing; give every part")
    all_assigned: list[str] = []
    locations: dict[str, tuple[Path, int]] = {}
    failures: list[list[str]] = []
    header: list[str] | None = None
    for part, record in records:
        assigned = list(record.get("assigned", []))
        index = int(record["shard"][0])
        wrong = next((i for i in assigned if shard_of(i, count) != index), None)
        if wrong is not None:
            raise RaptorError(f"{part}: its plan lists {wrong!r}, which belongs to shard {shard_of(wrong, count)}/{count}")
        all_assigned.extend(assigned)
        table = index_table(part)
        if table.torn_tail:
            raise RaptorError(f"{part}: ends with a torn row; rerun its shard to repair it")
        if header is None:
            header = table.header
        elif table.header != header:
            raise MetadataMismatch(f"{part}: has other columns than {first_part}")
        if table.settings is not None:
            check_compatible(first["settings"], table.settings, f"{part} rows vs {first_part}")
        assigned_set = set(assigned)
        for row_id, offset in zip(table.ids, table.offsets):
            if row_id not in assigned_set:
                raise RaptorError(f"{part}: row {row_id!r} is not in its shard's plan (the cohort changed since; rerun the shard)")
            if row_id in locations:
                raise RaptorError(f"series {row_id!r} appears in {locations[row_id][0]} and {part}")
            locations[row_id] = (part, offset)
        failed_rows = read_errors(errors_path_for_record(part, record))
        failed_ids = {r[0] for r in failed_rows}
        lacking = [i for i in assigned if i not in locations and i not in failed_ids]
        if lacking:
            raise RaptorError(
                f"{part}: shard {index}/{count} is incomplete: {len(lacking)} series neither embedded nor failed "
                f"(e.g. {lacking[0]!r}); rerun that shard"
            )
        failures.extend(r for r in failed_rows if r[0] not in locations)
    if cohort_digest(all_assigned) != first["cohort_sha256"] or len(set(all_assigned)) != len(all_assigned):
        raise RaptorError("the shards' plans do not add up to the planned cohort (a part was edited, or its plan is stale)")
    assert header is not None
    with atomic_write(output, "wb") as handle:
        handle.write(csv_line(header).encode("utf-8"))
        for row_id in sorted(locations):
            part, offset = locations[row_id]
            handle.write(read_line_at(part, offset))
    errors_csv = None
    if failures:
        errors_csv = errors_path_for(output)
        atomic_write_text(errors_csv, _csv_text([list(ERROR_COLUMNS), *failures]))
    merged = dict(first, shard=[0, 1], assigned=sorted(locations), status="complete", csv=output.name,
                  errors_csv=errors_csv.name if errors_csv else None,
                  counts={"done": len(locations), "failed": len(failures)},
                  updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    merged["merged_from"] = [str(Path(p).name) for p, _ in records]
    atomic_write_text(record_path_for(output), json.dumps(merged, indent=1) + "\n")
    return MergeSummary(output=output, rows=len(locations), failed=len(failures), parts=len(records), errors_csv=errors_csv)



def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
