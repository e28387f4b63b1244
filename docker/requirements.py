"""Print the requirements of pyproject.toml's extras, one per line, for installing an image's dependencies
before its source is copied (a code change then rebuilds only the last layers).

    python docker/requirements.py api s3          # self-references like masktune-service[service] are expanded
    python docker/requirements.py ml s3 --without torch torchvision
"""

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    name, optional = project["name"], project["optional-dependencies"]
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                todo.extend(own.group(1).split(","))
            else:
                out.append(req)
    bare = lambda req: re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    return sorted({req for req in out if bare(req) not in without}, key=str.lower)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("extras", nargs="+")
    ap.add_argument("--without", nargs="*", default=[], help="package names to leave out")
    ap.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = ap.parse_args()
    print("\n".join(requirements(args.extras, {w.lower() for w in args.without}, args.pyproject)))
