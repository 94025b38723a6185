"""DVC stage `provenance`: digests of the data and task split this audit scores (signed)."""

from __future__ import annotations

from pathlib import Path

from audit.provenance import write_provenance
from pipelines.common import stage


@stage
def main() -> None:
    print(f"wrote {write_provenance(Path('.'))}")


if __name__ == "__main__":
    main()
