"""DVC stage `report`: the self-contained HTML audit report (reports/audit.html)."""

from __future__ import annotations

from pathlib import Path

from audit.report import write_report
from pipelines.common import load_params, stage


@stage
def main() -> None:
    print(f"wrote {write_report(Path('.'), load_params())}")


if __name__ == "__main__":
    main()
