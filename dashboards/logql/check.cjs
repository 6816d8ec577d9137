#!/usr/bin/env node
// Parse LogQL expressions with Grafana's LogQL grammar (@grafana/lezer-logql).
// stdin: a JSON array of expressions. stdout: a JSON array, one entry per expression:
//   {"expr": ..., "errors": [{"from", "to", "text"}], "identifiers": [{"name", "stream"}]}
// "identifiers" lists every label/field name the expression refers to; "stream" is true for
// names in the stream selector ({job="..."}) and false for fields used after a parser stage
// (label filters, by/without groupings, label_format ...), so the caller can check them
// against the log schema. Names inside line_format templates are strings to this grammar.
"use strict";
const { parser } = require("@grafana/lezer-logql");

function check(expr) {
  const tree = parser.parse(expr);
  const errors = [];
  const identifiers = [];
  tree.iterate({
    enter(node) {
      if (node.type.isError) {
        errors.push({ from: node.from, to: node.to, text: expr.slice(Math.max(0, node.from - 20), node.to + 20) });
      }
      if (node.name === "Identifier") {
        let inSelector = false;
        for (let p = node.node.parent; p; p = p.parent) if (p.name === "Selector") inSelector = true;
        identifiers.push({ name: expr.slice(node.from, node.to), stream: inSelector });
      }
    },
  });
  return { expr, errors, identifiers };
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const exprs = JSON.parse(input);
  process.stdout.write(JSON.stringify(exprs.map(check)));
});
