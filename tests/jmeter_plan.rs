//! deploy/jmeter/shift-change.jmx: JMeter is not installed where the tests run, so the plan is
//! checked as XML (python3's xml.etree, as the other deploy checks use python3): well-formed, with
//! the PATCH presence sampler on keep-alive, its JSON body, the extractor of X-Shiftgate-Wait-Ms
//! under that sampler, the property-driven thread group, defaults and token, a token per agent
//! (property `tokens`), and the CSV writer.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const PLAN: &str = "deploy/jmeter/shift-change.jmx";

/// Reads the plan with xml.etree and prints what the assertions below need, as JSON.
const INSPECT: &str = r#"
import json, sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()

def props(el):
    out = {}
    for p in el:
        if p.tag in ("stringProp", "boolProp", "intProp", "longProp"):
            out[p.get("name")] = p.text or ""
    return out

def children_tree(parent, el):
    """The hashTree right after `el` in `parent`: what JMeter applies to `el`."""
    kids = list(parent)
    i = kids.index(el)
    return kids[i + 1] if i + 1 < len(kids) and kids[i + 1].tag == "hashTree" else None

parents = {c: p for p in root.iter() for c in p}
facts = {"root": root.tag, "samplers": [], "thread_groups": [], "defaults": [],
         "headers": [], "writers": []}
for s in root.iter("HTTPSamplerProxy"):
    p = props(s)
    body = [a.findtext("stringProp[@name='Argument.value']")
            for a in s.iter("elementProp") if a.get("elementType") == "HTTPArgument"]
    tree = children_tree(parents[s], s)
    extractors = []
    if tree is not None:
        for x in tree:
            if x.tag in ("RegexExtractor", "BoundaryExtractor"):
                extractors.append({"tag": x.tag, **props(x)})
    facts["samplers"].append({"props": p, "body": body, "extractors": extractors,
                              "enabled": s.get("enabled", "true")})
for t in root.iter("ThreadGroup"):
    p = props(t)
    loops = t.find("elementProp[@name='ThreadGroup.main_controller']")
    p["loops"] = props(loops).get("LoopController.loops") if loops is not None else None
    facts["thread_groups"].append(p)
for c in root.iter("ConfigTestElement"):
    if c.get("guiclass") == "HttpDefaultsGui":
        facts["defaults"].append(props(c))
for e in root.iter("elementProp"):
    if e.get("elementType") == "Header":
        facts["headers"].append(props(e))
facts["user_parameters"] = []
for u in root.iter("UserParameters"):
    names = [n.text for n in u.find("collectionProp[@name='UserParameters.names']")]
    values = [v.text for col in u.find("collectionProp[@name='UserParameters.thread_values']")
              for v in col]
    facts["user_parameters"].append({"names": names, "values": values,
                                     "enabled": u.get("enabled", "true")})
for r in root.iter("ResultCollector"):
    facts["writers"].append({"guiclass": r.get("guiclass"), **props(r)})
facts["properties"] = sorted({a.findtext("stringProp[@name='Argument.value']")
                              for a in root.iter("elementProp")
                              if a.get("elementType") == "Argument"} - {None})
print(json.dumps(facts))
"#;

fn inspect() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PLAN);
    let output = Command::new("python3")
        .arg("-c")
        .arg(INSPECT)
        .arg(&path)
        .output()
        .expect("python3 runs (it checks the deploy files)");
    assert!(
        output.status.success(),
        "{PLAN} is not well-formed XML or could not be read:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the inspector prints JSON")
}

#[test]
fn the_jmeter_plan_is_well_formed_and_patches_presence_through_the_proxy() {
    let facts = inspect();
    assert_eq!(facts["root"], "jmeterTestPlan");

    let samplers = facts["samplers"].as_array().unwrap();
    let patch = samplers
        .iter()
        .find(|s| s["props"]["HTTPSampler.method"] == "PATCH")
        .unwrap_or_else(|| panic!("no PATCH sampler: {samplers:#?}"));
    let p = &patch["props"];
    assert_eq!(
        p["HTTPSampler.path"],
        "/api/v2/users/${userId}/presences/purecloud"
    );
    assert_eq!(p["HTTPSampler.use_keepalive"], "true", "keep-alive on");
    assert_eq!(p["HTTPSampler.postBodyRaw"], "true", "a raw JSON body");
    assert_eq!(patch["enabled"], "true");

    // The body is Genesys's presence PATCH body once JMeter has filled in the variable.
    let body = patch["body"][0].as_str().expect("a body");
    let body: Value = serde_json::from_str(&body.replace("${presenceId}", "x")).unwrap();
    assert_eq!(body["presenceDefinition"]["id"], "x");
    assert_eq!(body["primary"], true);

    // The wait header is extracted from the response headers of that sampler.
    let extractors = patch["extractors"].as_array().unwrap();
    let wait = extractors
        .iter()
        .find(|x| {
            x["RegexExtractor.regex"]
                .as_str()
                .unwrap_or("")
                .contains("X-Shiftgate-Wait-Ms")
        })
        .unwrap_or_else(|| {
            panic!("no X-Shiftgate-Wait-Ms extractor under the sampler: {extractors:#?}")
        });
    assert_eq!(
        wait["RegexExtractor.useHeaders"], "true",
        "reads response headers"
    );
    assert_eq!(wait["RegexExtractor.refname"], "waitMs");
    assert_eq!(wait["RegexExtractor.template"], "$1$");

    // N agents × loops, from properties.
    let tg = &facts["thread_groups"][0];
    assert!(tg["ThreadGroup.num_threads"]
        .as_str()
        .unwrap()
        .starts_with("${__P(agents,"));
    assert!(tg["loops"].as_str().unwrap().starts_with("${__P(loops,"));

    // The defaults point at the proxy, host and port from properties.
    let defaults = &facts["defaults"][0];
    assert_eq!(defaults["HTTPSampler.domain"], "${host}");
    assert_eq!(defaults["HTTPSampler.port"], "${port}");
    let properties: Vec<&str> = facts["properties"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for wanted in [
        "${__P(host,",
        "${__P(port,",
        "${__P(token,",
        "${__P(tokens,0)}",
    ] {
        assert!(
            properties.iter().any(|p| p.starts_with(wanted)),
            "no {wanted}...) among {properties:?}"
        );
    }

    // Each agent's own token goes in the Authorization header: one token shared by every thread
    // is one token's 300/min (5/s) for the whole shift change, so the default (tokens 0) gives
    // each thread its own, made from `token` and the thread number, in an element of its own
    // (enabled, and apart from the userId one that "Real user ids" replaces).
    let headers = facts["headers"].as_array().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h["Header.name"] == "Authorization"
                && h["Header.value"] == "Bearer ${agentToken}"),
        "{headers:#?}"
    );
    let params = facts["user_parameters"].as_array().unwrap();
    let agent_token = params
        .iter()
        .find(|u| u["names"] == serde_json::json!(["agentToken"]))
        .unwrap_or_else(|| panic!("no UserParameters setting agentToken alone: {params:#?}"));
    assert_eq!(agent_token["enabled"], "true");
    let expr = agent_token["values"][0].as_str().unwrap();
    for part in [
        "vars.get('tokens')",
        "vars.get('token')",
        "ctx.getThreadNum()",
        "i % n",
    ] {
        assert!(expr.contains(part), "agentToken {expr:?} lacks {part}");
    }
    assert!(
        !expr.contains(','),
        "a bare comma ends a JMeter function argument: {expr:?}"
    );

    // Results go to a CSV through a Simple Data Writer.
    let writers = facts["writers"].as_array().unwrap();
    assert!(
        writers.iter().any(|w| w["guiclass"] == "SimpleDataWriter"
            && w["filename"].as_str().is_some_and(|f| f.contains(".csv"))),
        "{writers:#?}"
    );
}
