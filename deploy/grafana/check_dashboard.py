#!/usr/bin/env python3
"""Print every PromQL expression of the shiftgate dashboard, ready to evaluate without Grafana.

Usage: python3 check_dashboard.py [DASHBOARD_JSON]   (default: shiftgate.json next to this file)

Output: one JSON object per line, {"panel": <title>, "expr": <expr>}, with Grafana's variables
replaced the way an all-selected dashboard would send them: $route and $budget -> .* (they are
used as regex matchers, route=~"$route"), $__rate_interval -> 1m, $__range -> 5m. A variable
the script does not know is an error, so an end-to-end test cannot silently query a literal
"$something".

It also checks what an importer relies on (uid, the datasource variable, a description on each
panel, every query on ${datasource}); problems go to stderr and the exit status is 1.
Standard library only.
"""

import json
import os
import re
import sys

SUBSTITUTIONS = {
    "route": ".*",
    "budget": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
}

# $name, ${name}, ${name:format} and the legacy [[name]]; the name is matched whole, so
# $__range_ms is reported as unknown instead of becoming "5m_ms".
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def substitute(expr, problems, where):
    def replace(match):
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in SUBSTITUTIONS:
            problems.append(f"{where}: unknown variable {match.group(0)!r} in {expr!r}")
            return match.group(0)
        return SUBSTITUTIONS[name]

    return VARIABLE.sub(replace, expr)


def all_panels(panels):
    """Panels in dashboard order, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def main(argv):
    path = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "shiftgate.json")
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)

    problems = []
    if dashboard.get("uid") != "shiftgate":
        problems.append(f"uid is {dashboard.get('uid')!r}, expected 'shiftgate'")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no template variable 'datasource' of type datasource/prometheus")
    for name in ("route", "budget"):
        v = variables.get(name, {})
        if not (v.get("multi") and v.get("includeAll") and "label_values(" in str(v.get("definition", ""))):
            problems.append(f"variable {name!r} must be a multi-select label_values(...) query with All")

    count = 0
    for panel in all_panels(dashboard.get("panels", [])):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "")
        if not panel.get("description"):
            problems.append(f"panel {title!r} has no description")
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"panel {title!r} does not use ${{datasource}}")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"panel {title!r} has no query")
        for t in targets:
            if t.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"panel {title!r} query {t.get('refId')} does not use ${{datasource}}")
            expr = t.get("expr", "")
            if not expr.strip():
                problems.append(f"panel {title!r} query {t.get('refId')} has no expr")
                continue
            print(json.dumps({"panel": title, "expr": substitute(expr, problems, f"panel {title!r}")}))
            count += 1

    sys.stdout.flush()
    for p in problems:
        print(f"check_dashboard: {p}", file=sys.stderr)
    print(f"check_dashboard: {count} expressions, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
