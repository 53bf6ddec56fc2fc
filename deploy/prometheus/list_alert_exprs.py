#!/usr/bin/env python3
"""Print every alert expression of alerts.yml, ready to evaluate against a real Prometheus.

Usage: python3 list_alert_exprs.py [ALERTS_YML]   (default: alerts.yml next to this file)

Output: one JSON object per line, {"alert": <name>, "expr": <expr>, "for": <duration>}.

Standard library only, so this reads the subset of YAML that alerts.yml uses: rules that open
with `- alert: NAME` and carry `expr:` either on one line (plain or quoted) or as a `|` / `>`
block. A rule it cannot read is an error (exit 1), never skipped; `promtool check rules` stays
the authority on the file itself.
"""

import json
import os
import re
import sys

ALERT = re.compile(r"^(\s*)- alert:\s*(\S.*?)\s*$")
KEY = re.compile(r"^(\s*)(expr|for):\s*(.*?)\s*$")


def unquote(value):
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    return value


def block(lines, start, key_indent, style):
    """The block scalar after `expr: |` (or `>`) whose first line is lines[start]."""
    body = []
    indent = None
    i = start
    while i < len(lines):
        line = lines[i]
        if line.strip():
            this = len(line) - len(line.lstrip())
            if this <= key_indent:
                break
            indent = this if indent is None else indent
            body.append(line[indent:])
        else:
            body.append("")
        i += 1
    while body and not body[-1]:
        body.pop()
    text = "\n".join(body) if style.startswith("|") else " ".join(l.strip() for l in body)
    return text.strip(), i


def parse(text):
    lines = text.splitlines()
    rules = []
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = ALERT.match(line)
        if m:
            current = {"alert": unquote(m.group(2)), "expr": None, "for": "0s"}
            rules.append(current)
            i += 1
            continue
        m = KEY.match(line)
        if m and current is not None:
            indent, key, value = len(m.group(1)), m.group(2), m.group(3)
            if key == "expr" and value[:1] in ("|", ">"):
                current["expr"], i = block(lines, i + 1, indent, value)
                continue
            current[key] = unquote(value)
        i += 1
    return rules


def main(argv):
    path = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "alerts.yml")
    with open(path, encoding="utf-8") as f:
        rules = parse(f.read())
    bad = [r["alert"] for r in rules if not r["expr"]]
    for r in rules:
        if r["expr"]:
            print(json.dumps(r))
    if bad or not rules:
        print(f"list_alert_exprs: no expr read for {bad or 'any alert'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
