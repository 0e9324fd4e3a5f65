"""The row statuses: the one vocabulary every stage, the sink, `psp invert` and `psp nightly` use.

Every output row has exactly one `status`. `FINAL_STATUSES` are properties of the input itself:
rerunning on the same bytes gives the same answer, so a rerun (`psp invert` into the same output,
`psp nightly --retry-failed`) leaves those rows alone until the input changes. The others may be the
infrastructure's fault (network, a stalled object, a busy machine, out of memory) and are retried.
"""
from __future__ import annotations

OK = "ok"
# read stage
READ_ERROR = "read_error"  # could not fetch the bytes, or timed out: retried
NOT_A_FILE = "not_a_file"  # FIFO, socket, device node, a link to one, a dangling link: never opened
CONTAINER_ERROR = "container_error"  # a .tar / .parquet that cannot be listed (corrupt, no image column)
# decode stage
DECODE_ERROR = "decode_error"  # not an image, truncated, unsupported format, empty
DECODE_TIMEOUT = "decode_timeout"  # over the decode time limit: retried
TOO_LARGE = "too_large"  # over max_pixels (decompression-bomb guard)
TOO_SMALL = "too_small"  # a side under 40 px
# align / invert stages
NO_FACE = "no_face"
ALIGN_ERROR = "align_error"
INVERT_ERROR = "invert_error"

STATUSES = (
    OK,
    READ_ERROR,
    NOT_A_FILE,
    CONTAINER_ERROR,
    DECODE_ERROR,
    DECODE_TIMEOUT,
    TOO_LARGE,
    TOO_SMALL,
    NO_FACE,
    ALIGN_ERROR,
    INVERT_ERROR,
)
#: Permanent: a rerun skips these rows (until the input changes, for `psp nightly`).
FINAL_STATUSES = (OK, NOT_A_FILE, CONTAINER_ERROR, DECODE_ERROR, TOO_LARGE, TOO_SMALL, NO_FACE)
#: Retried by a rerun and by `psp nightly --retry-failed`.
RETRYABLE_STATUSES = tuple(s for s in STATUSES if s not in FINAL_STATUSES)


def is_final(status: str | None) -> bool:
    """True for a status a rerun leaves alone (ok, or a property of the input)."""
    return status in FINAL_STATUSES


def is_transient(status: str | None) -> bool:
    """True for a failed row worth retrying (`--retry-failed`): not ok and not a property of the input."""
    return status not in FINAL_STATUSES
