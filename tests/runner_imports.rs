//! No two files of `src/runner/` import each other, directly or through others:
//! each file's `use super::X` / `super::X::` / `crate::runner::X` names an edge,
//! and the graph must have no cycle. Unit test modules are left out: they are
//! leaves, free to use the test seam (`fake.rs`) that uses what they test.
//! Run with `--nocapture` to see the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use regex::Regex;

/// The code of a runner file that speaks for the file: comments dropped, and
/// only what comes before its test module.
fn edges_of(source: &str, modules: &BTreeSet<String>, me: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let top = code.split("#[cfg(test)]").next().unwrap_or_default();
    let single = Regex::new(r"\bsuper::([a-z_][a-z0-9_]*)\b").unwrap();
    let grouped = Regex::new(r"\bsuper::\{([^}]*)\}").unwrap();
    let absolute = Regex::new(r"\bcrate::runner::([a-z_][a-z0-9_]*)\b").unwrap();
    let mut names: Vec<String> = Vec::new();
    names.extend(single.captures_iter(top).map(|c| c[1].to_string()));
    for group in grouped.captures_iter(top) {
        names.extend(
            group[1]
                .split(',')
                .filter_map(|item| item.trim().split("::").next())
                .map(str::to_string),
        );
    }
    names.extend(absolute.captures_iter(top).map(|c| c[1].to_string()));
    names
        .into_iter()
        .filter(|n| modules.contains(n) && n != me)
        .collect()
}

/// A cycle through `node`, if any (depth-first, `path` holds the current chain).
fn find_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|n| n == node) {
        let mut cycle = path[at..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in &graph[node] {
        if let Some(cycle) = find_cycle(graph, next, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn no_file_of_the_runner_imports_one_that_imports_it_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/runner");
    let files: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| p.file_stem().is_some_and(|s| s != "mod"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .map(|(name, source)| (name.clone(), edges_of(source, &modules, name)))
        .collect();
    for (from, to) in &graph {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!("{from} -> {}", to.join(", "));
    }
    // The parser must see the edges there are, or the test could never fail.
    assert!(graph["pipeline"].contains("registry"), "{graph:#?}");
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            panic!("import cycle in src/runner: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle_of_two() {
    let modules: BTreeSet<String> = ["rest", "mcp"].map(String::from).into();
    let rest = edges_of("use super::mcp;\n", &modules, "rest");
    let mcp = edges_of(
        "use super::{rest::{call_context}, x};\n// use super::nothing\n#[cfg(test)]\nuse crate::runner::zzz;",
        &modules,
        "mcp",
    );
    let graph = BTreeMap::from([("rest".to_string(), rest), ("mcp".to_string(), mcp)]);
    let cycle = find_cycle(&graph, "rest", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(cycle.unwrap(), ["rest", "mcp", "rest"]);
}
