"""Print, as one bash script, the commands of the README's "Set up on a fresh machine"
section in the order a user types them, so CI runs exactly what the README says.

torch is optional for users; CI requires the parity tests to run, so it installs torch's
CPU build (the one on disk on CI machines) just before the README's test command.
"""
import re
import sys

SECTION = "## Set up on a fresh machine"


def blocks(readme):
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end >= 0 else None]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def main(path):
    with open(path, encoding="utf-8") as f:
        found = blocks(f.read())
    if len(found) < 2 or "pytest" not in found[-1]:
        sys.exit(f"{path}: the set-up section must end with the test command; found {found}")
    lines = ["set -euxo pipefail"]
    lines += found[:-1]
    lines += ["python -m pip install --quiet torch==2.13.0   # CI only: the parity tests"]
    lines += [found[-1]]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "README.md")
