#!/usr/bin/env python3
"""Print every PromQL expression of the shiftgate dashboard, ready to evaluate without Grafana.

Usage: python3 check_dashboard.py [DASHBOARD_JSON]   (default: shiftgate.json next to this file)

Output: one JSON object per line, {"panel": <title>, "expr": <expr>} for each panel query and
{"annotation": <name>, "expr": <expr>} for each annotation query, with Grafana's variables
replaced the way an all-selected dashboard would send them: $job -> shiftgate, $namespace,
$instance, $route and $budget -> .* (they are used as regex matchers, route=~"$route"; .* also
matches a missing label, so no namespace outside Kubernetes is fine), $__rate_interval -> 1m,
$__range -> 5m. A variable the script does not know is an error, so an end-to-end test cannot
silently query a literal "$something".

It also checks what an importer relies on (uid, the datasource variable, the job, namespace and
instance variables, a description on each panel, every query on ${datasource} and scoped to
$job, $namespace and $instance); problems go to stderr and the exit status is 1.
Standard library only.
"""

import json
import os
import re
import sys

SUBSTITUTIONS = {
    "job": "shiftgate",
    "namespace": ".*",
    "instance": ".*",
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

# Every metric selector of a query carries these, so the job, namespace and replica pickers
# apply to every panel (process_* series of other jobs included).
SCOPE = 'job="$job",namespace=~"$namespace",instance=~"$instance"'
METRIC = re.compile(r"\b((?:shiftgate|process)_[a-zA-Z0-9_]+)(\{[^}]*\})?")


def unscoped(expr):
    """Metric selectors of expr that lack SCOPE."""
    return [m.group(0) for m in METRIC.finditer(expr) if SCOPE not in (m.group(2) or "")]


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
    for name in ("namespace", "instance", "route", "budget"):
        v = variables.get(name, {})
        if not (v.get("multi") and v.get("includeAll") and v.get("allValue") == ".*"
                and "label_values(" in str(v.get("definition", ""))):
            problems.append(f"variable {name!r} must be a multi-select label_values(...) query with All (.*)")
    job = variables.get("job", {})
    if "label_values(" not in str(job.get("definition", "")) or job.get("multi"):
        problems.append("variable 'job' must be a single-select label_values(...) query")

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
            for sel in unscoped(expr):
                problems.append(f"panel {title!r} query {t.get('refId')}: {sel} lacks {SCOPE}")
            print(json.dumps({"panel": title, "expr": substitute(expr, problems, f"panel {title!r}")}))
            count += 1

    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("builtIn"):
            continue
        name = a.get("name", "")
        expr = a.get("expr", "")
        if a.get("datasource") != DATASOURCE:
            problems.append(f"annotation {name!r} does not use ${{datasource}}")
        if not expr.strip():
            problems.append(f"annotation {name!r} has no expr")
            continue
        for sel in unscoped(expr):
            problems.append(f"annotation {name!r}: {sel} lacks {SCOPE}")
        print(json.dumps({"annotation": name, "expr": substitute(expr, problems, f"annotation {name!r}")}))
        count += 1

    sys.stdout.flush()
    for p in problems:
        print(f"check_dashboard: {p}", file=sys.stderr)
    print(f"check_dashboard: {count} expressions, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
