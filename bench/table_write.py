"""What one data file of the output table costs to write and to rewrite (the commit's rewrite of a
touched file), in one process, on rows of the real output schema (random W+ of 18 styles, no
images: `--images none`, as `bench/scale.py` writes them).

    python bench/table_write.py                 # 2,048 rows (a file at FILE_TARGET_BYTES), 3 repeats
    python bench/table_write.py --rows 4096 --drop 40

Printed, best of the repeats (seconds per file): the Parquet write as `OutputTable.write_parquet`
does it (dictionary encoding and statistics on the flat columns only) against pyarrow's defaults
(every column), the read of the file, and dropping `--drop` rows (a 1 % nightly's share) by a
filter against `pipelines.replace.without_rows` (slices). Both writes are checked to read back equal.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import schemas
    from pipelines.replace import without_rows
    from pipelines.table import OutputTable
    from schemas.testing import example_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--drop", type=int, default=20, help="rows a rewrite drops (default: 1 %%)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rows = example_rows(n_ok=args.rows, n_err=0, n_styles=18, prefix="bench")
    for r in rows:
        r["output_image"] = None
    table = schemas.rows_to_table(rows, n_styles=18)
    print(f"{table.num_rows} rows, {table.nbytes / 2**20:.1f} MiB in Arrow")

    with tempfile.TemporaryDirectory() as tmp:
        out = OutputTable(str(Path(tmp) / "t"))
        ours = best(lambda: out.write_parquet("f.parquet", table), args.repeats)
        path = Path(tmp) / "t" / "f.parquet"

        def default_write():
            pq.write_table(table, io.BytesIO(), row_group_size=table.num_rows, compression="snappy")

        default = best(default_write, args.repeats)
        read = best(lambda: out.read_file("f.parquet"), args.repeats)
        assert out.read_file("f.parquet").equals(table), "the file does not read back equal"
        drop = np.sort(np.random.default_rng(0).choice(table.num_rows, args.drop, replace=False))
        every = pa.array(np.arange(table.num_rows, dtype=np.int64))
        filt = best(lambda: table.filter(pc.invert(pc.is_in(every, value_set=pa.array(drop)))), args.repeats)
        sliced = best(lambda: without_rows(table, drop), args.repeats)
        print(f"file: {path.stat().st_size / 2**20:.1f} MiB")
        print(f"write, pyarrow defaults (dictionary + statistics on every column): {default:.3f} s")
        print(f"write, OutputTable.write_parquet (flat columns only):              {ours:.3f} s  ({default / ours:.2f}x)")
        print(f"read the file:                                                    {read:.3f} s")
        print(f"drop {args.drop} rows: filter {filt:.4f} s, slices {sliced:.5f} s")
        print(f"a rewrite (read + drop + write): before {read + filt + default:.3f} s, now {read + sliced + ours:.3f} s "
              f"({(read + filt + default) / (read + sliced + ours):.2f}x)")


if __name__ == "__main__":
    main()
