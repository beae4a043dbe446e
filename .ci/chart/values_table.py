"""The values table of helm/deltasync/README.md, from values.yaml's `# --` comments.

python .ci/chart/values_table.py          prints it
python .ci/chart/values_table.py --check  fails if the README's copy differs
"""

import pathlib
import re
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "helm" / "deltasync"
BEGIN, END = "<!-- values-table -->", "<!-- /values-table -->"


def table() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows, path, doc = [], [], []
    for line in (CHART / "values.yaml").read_text().splitlines():
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if text.startswith("# --"):
            doc = [text[4:].strip()]
        elif text.startswith("#") and doc:
            doc.append(text[1:].strip())
        elif m := re.match(r"([A-Za-z][\w]*):", text):
            path = path[: indent // 2] + [m.group(1)]
            if doc:
                node = values
                for key in path:
                    node = node[key]
                default = "`" + yaml.safe_dump(node, default_flow_style=True, width=1000).strip().removesuffix("\n...") + "`"
                default = default.replace("|", "\\|")
                rows.append(f"| `{'.'.join(path)}` | {default} | {' '.join(doc)} |")
            doc = []
        elif not text:
            doc = []
    return "\n".join(["| Key | Default | Description |", "|---|---|---|", *rows])


if __name__ == "__main__":
    current = table()
    if "--check" in sys.argv:
        readme = (CHART / "README.md").read_text()
        inside = readme.split(BEGIN)[1].split(END)[0].strip()
        if inside != current:
            sys.exit("helm/deltasync/README.md: the values table is stale; run python .ci/chart/values_table.py")
        print("ok   helm/deltasync/README.md values table matches values.yaml")
    else:
        print(current)
