"""DVC stage `headline`: metrics/headline.json, the only file declared as a DVC metric."""

from __future__ import annotations

from pathlib import Path

from audit.headline import write_headline
from pipelines.common import load_params, stage


@stage
def main() -> None:
    print(f"wrote {write_headline(Path('.'), load_params())}")


if __name__ == "__main__":
    main()
