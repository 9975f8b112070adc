//! The string nodes (ComfyUI's `comfy_extras/nodes_string.py`, `utils/string`): concatenate,
//! substring, length, case, trim, replace, contains, compare, and the regex match, extract and
//! replace, with Python's `str` ([`python_str`]) and `re` ([`python_re`]) semantics.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use serde_json::json;

use super::python_re::{PythonRegex, ReError};
use super::python_str;

const MODULE: &str = "comfy_extras.nodes_string";

fn schema(class: &str, display_name: &str) -> NodeSchema {
    NodeSchema::v3(class, MODULE, "utils/string").display(display_name)
}

/// A V3 `io.String.Input`.
pub(crate) fn text(multiline: bool) -> InputSpec {
    InputSpec::of("STRING").opt("multiline", multiline)
}

fn output(value: serde_json::Value) -> Result<NodeOutput, NodeError> {
    Ok(NodeOutput::values(vec![Value::Json(value)]))
}

/// The regex flag inputs of RegexMatch and RegexExtract.
fn with_flags(schema: NodeSchema) -> NodeSchema {
    schema
        .required("case_insensitive", InputSpec::boolean(true))
        .required("multiline", InputSpec::boolean(false))
        .required("dotall", InputSpec::boolean(false))
}

/// The pattern compiled with the node's flags (absent optional flags take their defaults), or
/// why Python would not compile it.
fn regex(inputs: &NodeInputs) -> Result<Result<PythonRegex, ReError>, NodeError> {
    let flag = |name: &str, default: bool| match inputs.get(name) {
        Some(_) => inputs.bool(name),
        None => Ok(default),
    };
    Ok(PythonRegex::new(
        inputs.string("regex_pattern")?,
        flag("case_insensitive", true)?,
        flag("multiline", false)?,
        flag("dotall", false)?,
    ))
}

/// `StringConcatenate`: `delimiter.join((string_a, string_b))`.
pub struct StringConcatenate;

impl Node for StringConcatenate {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringConcatenate", "Concatenate")
            .required("string_a", text(true))
            .required("string_b", text(true))
            .required("delimiter", InputSpec::string("").opt("multiline", false))
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (a, b) = (inputs.string("string_a")?, inputs.string("string_b")?);
        output(json!([a, b].join(inputs.string("delimiter")?)))
    }
}

/// `StringSubstring`: `string[start:end]`.
pub struct StringSubstring;

impl Node for StringSubstring {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringSubstring", "Substring")
            .required("string", text(true))
            .required("start", InputSpec::of("INT"))
            .required("end", InputSpec::of("INT"))
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        output(json!(python_str::slice(
            string,
            inputs.int("start")?,
            inputs.int("end")?
        )))
    }
}

/// `StringLength`: the number of code points.
pub struct StringLength;

impl Node for StringLength {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringLength", "Length")
            .required("string", text(true))
            .output(OutputSpec::of("INT").named("length"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        output(json!(inputs.string("string")?.chars().count()))
    }
}

/// `CaseConverter`: `upper`, `lower`, `capitalize` or `title`.
pub struct CaseConverter;

impl Node for CaseConverter {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("CaseConverter", "Case Converter")
            .required("string", text(true))
            .required(
                "mode",
                InputSpec::combo_v3(&["UPPERCASE", "lowercase", "Capitalize", "Title Case"]),
            )
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        let converted = match inputs.string("mode")? {
            "UPPERCASE" => string.to_uppercase(),
            "lowercase" => string.to_lowercase(),
            "Capitalize" => python_str::capitalize(string),
            "Title Case" => python_str::title(string),
            _ => string.to_string(),
        };
        output(json!(converted))
    }
}

/// `StringTrim`: `strip`, `lstrip` or `rstrip`.
pub struct StringTrim;

impl Node for StringTrim {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringTrim", "Trim")
            .required("string", text(true))
            .required("mode", InputSpec::combo_v3(&["Both", "Left", "Right"]))
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        let trimmed = match inputs.string("mode")? {
            "Both" => string.trim_matches(python_str::is_space),
            "Left" => string.trim_start_matches(python_str::is_space),
            "Right" => string.trim_end_matches(python_str::is_space),
            _ => string,
        };
        output(json!(trimmed))
    }
}

/// `StringReplace`: every occurrence of `find` replaced.
pub struct StringReplace;

impl Node for StringReplace {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringReplace", "Replace")
            .required("string", text(true))
            .required("find", text(true))
            .required("replace", text(true))
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        output(json!(string.replace(inputs.string("find")?, inputs.string("replace")?)))
    }
}

/// `StringContains`: `substring in string`, optionally after lower-casing both.
pub struct StringContains;

impl Node for StringContains {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringContains", "Contains")
            .required("string", text(true))
            .required("substring", text(true))
            .required("case_sensitive", InputSpec::boolean(true))
            .output(OutputSpec::of("BOOLEAN").named("contains"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (string, substring) = (inputs.string("string")?, inputs.string("substring")?);
        let contains = if inputs.bool("case_sensitive")? {
            string.contains(substring)
        } else {
            string.to_lowercase().contains(&substring.to_lowercase())
        };
        output(json!(contains))
    }
}

/// `StringCompare`: starts with, ends with or equals, optionally after lower-casing both.
pub struct StringCompare;

impl Node for StringCompare {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("StringCompare", "Compare")
            .required("string_a", text(true))
            .required("string_b", text(true))
            .required("mode", InputSpec::combo_v3(&["Starts With", "Ends With", "Equal"]))
            .required("case_sensitive", InputSpec::boolean(true))
            .output(OutputSpec::of("BOOLEAN"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (mut a, mut b) = (
            inputs.string("string_a")?.to_string(),
            inputs.string("string_b")?.to_string(),
        );
        if !inputs.bool("case_sensitive")? {
            (a, b) = (a.to_lowercase(), b.to_lowercase());
        }
        let result = match inputs.string("mode")? {
            "Starts With" => a.starts_with(&b),
            "Ends With" => a.ends_with(&b),
            "Equal" => a == b,
            // ComfyUI returns None for any other mode.
            _ => return output(serde_json::Value::Null),
        };
        output(json!(result))
    }
}

/// `RegexMatch`: whether `re.search` finds the pattern (false for a bad pattern).
pub struct RegexMatch;

impl Node for RegexMatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        with_flags(
            schema("RegexMatch", "Regex Match")
                .required("string", text(true))
                .required("regex_pattern", text(true)),
        )
        .output(OutputSpec::of("BOOLEAN").named("matches"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        let matches = regex(inputs)?
            .and_then(|regex| regex.search(string))
            .is_ok_and(|found| found.is_some());
        output(json!(matches))
    }
}

/// `RegexExtract`: the first match, every match, a group of the first match or that group of
/// every match, joined by newlines ("" for a bad pattern).
pub struct RegexExtract;

impl Node for RegexExtract {
    fn schema(&self, _: &Services) -> NodeSchema {
        with_flags(
            schema("RegexExtract", "Regex Extract")
                .required("string", text(true))
                .required("regex_pattern", text(true))
                .required(
                    "mode",
                    InputSpec::combo_v3(&["First Match", "All Matches", "First Group", "All Groups"]),
                ),
        )
        .required("group_index", InputSpec::int(1, 0, 100))
        .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let string = inputs.string("string")?;
        let mode = inputs.string("mode")?;
        let group_index = inputs.int("group_index")?.max(0) as usize;
        let Ok(regex) = regex(inputs)? else {
            return output(json!(""));
        };
        let group = |captures: &fancy_regex::Captures, index: usize| {
            captures.get(index).map_or("", |group| group.as_str()).to_string()
        };
        let extracted = match mode {
            "First Match" => regex.search(string).map(|found| found.map(|c| group(&c, 0))),
            // `re.findall`: the whole match without groups, the first group with any.
            "All Matches" => regex.find_all(string, 0).map(|all| {
                let index = usize::from(regex.groups() > 0);
                Some(all.iter().map(|c| group(c, index)).collect::<Vec<_>>().join("\n"))
            }),
            "First Group" => regex.search(string).map(|found| {
                found
                    .filter(|_| regex.groups() >= group_index)
                    .map(|c| group(&c, group_index))
            }),
            "All Groups" => regex.find_all(string, 0).map(|all| {
                let usable = regex.groups() > 0 && regex.groups() >= group_index;
                let groups: Vec<String> = all.iter().filter(|_| usable).map(|c| group(c, group_index)).collect();
                Some(groups.join("\n"))
            }),
            _ => Ok(None),
        };
        output(json!(extracted.ok().flatten().unwrap_or_default()))
    }
}

/// `RegexReplace`: `re.sub` with a Python template; a bad pattern or template fails the node.
pub struct RegexReplace;

impl Node for RegexReplace {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("RegexReplace", "Regex Replace")
            .description("Find and replace text using regex patterns.")
            .required("string", text(true))
            .required("regex_pattern", text(true))
            .required("replace", text(true))
            .optional("case_insensitive", InputSpec::boolean(true))
            .optional("multiline", InputSpec::boolean(false))
            .optional(
                "dotall",
                InputSpec::of("BOOLEAN")
                    .opt(
                        "tooltip",
                        "When enabled, the dot (.) character will match any character including newline characters. When disabled, dots won't match newlines.",
                    )
                    .opt("default", false),
            )
            .optional(
                "count",
                InputSpec::of("INT")
                    .opt(
                        "tooltip",
                        "Maximum number of replacements to make. Set to 0 to replace all occurrences (default). Set to 1 to replace only the first match, 2 for the first two matches, etc.",
                    )
                    .opt("default", 0)
                    .opt("min", 0)
                    .opt("max", 100),
            )
            .output(OutputSpec::of("STRING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let count = match inputs.get("count") {
            Some(_) => inputs.int("count")?.max(0) as usize,
            None => 0,
        };
        let (string, template) = (inputs.string("string")?, inputs.string("replace")?);
        let replaced = regex(inputs)?
            .and_then(|regex| regex.sub(string, template, count))
            .map_err(|error| NodeError::typed("re.error", error.to_string()))?;
        output(json!(replaced))
    }
}
