"""Lints coffer's Helm chart strictly and renders it with each value set
given as JSON on stdin ({"name": values, ...}); writes each rendering to
<out>/<name>.yaml. Uses Helm's own Go library (PyPI helm-python-sdk)."""

import json
import pathlib
import sys

import helm_python as helm

chart_dir, out_dir = sys.argv[1], pathlib.Path(sys.argv[2])
lint = helm.lint(chart_dir, strict=True, namespace="coffer")
if lint["errors"]:
    sys.exit(f"helm lint: {lint['errors']}")
chart = helm.Chart.load(chart_dir)
for name, values in json.load(sys.stdin).items():
    rendered = chart.render(values, name="coffer", namespace="coffer", is_install=True)
    docs = [text for _, text in sorted(rendered.items()) if text.strip()]
    (out_dir / f"{name}.yaml").write_text("\n---\n".join(docs))
print(json.dumps(lint["messages"]))
