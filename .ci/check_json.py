"""Every JSON file the project writes by hand or generates is formatted as `json.dumps(..., indent=4)` plus a newline
(the Model Zoo's style), so that diffs of configs stay readable. `--fix` rewrites the files that are not.

Skipped: tests/data (copies of upstream files, kept byte for byte)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("tests/data/",)


def main() -> int:
    fix = "--fix" in sys.argv[1:]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.json"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    bad = []
    for name in sorted(set(listed)):
        if name.startswith(SKIP) or not (ROOT / name).is_file():
            continue
        text = (ROOT / name).read_text(encoding="utf-8")
        try:
            formatted = json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"
        except json.JSONDecodeError as e:
            print(f"{name}: not valid JSON: {e}")
            bad.append(name)
            continue
        if text != formatted:
            bad.append(name)
            if fix:
                (ROOT / name).write_text(formatted, encoding="utf-8")
            hint = "reformatted" if fix else "not formatted with indent 4 (run python .ci/check_json.py --fix)"
            print(f"{name}: {hint}")
    return 1 if bad and not fix else 0


if __name__ == "__main__":
    sys.exit(main())
