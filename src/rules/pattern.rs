//! The small languages inside a rule: component globs, axis permutation patterns and
//! target name templates. Each parses once, when the rule file is read, into a form
//! that cannot fail to evaluate except on a rank mismatch.

use std::fmt;

/// A glob over one path component: `*` matches any run of characters, `?` one
/// character, everything else itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Glob {
    chars: Vec<char>,
}

impl Glob {
    pub(crate) fn new(text: &str) -> Result<Glob, String> {
        if text.contains('.') {
            return Err(format!(
                "'{text}' contains '.', but it matches one path component"
            ));
        }
        Ok(Glob {
            chars: text.chars().collect(),
        })
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        // Classic wildcard DP over (pattern prefix, text prefix); O(p·t), no backtracking
        // blow-up on patterns with many `*`.
        let mut row = vec![false; text.len() + 1];
        row[0] = true;
        for &p in &self.chars {
            let mut next = vec![false; text.len() + 1];
            if p == '*' {
                let mut any = false;
                for (j, slot) in next.iter_mut().enumerate() {
                    any |= row[j];
                    *slot = any;
                }
            } else {
                for (j, &c) in text.iter().enumerate() {
                    next[j + 1] = row[j] && (p == '?' || p == c);
                }
            }
            row = next;
        }
        row[text.len()]
    }
}

/// A glob over a whole module path, component by component: `**` matches any number of
/// components (zero included), any other component is a [`Glob`]. The empty pattern
/// matches only the top level (a module with no components).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathGlob {
    parts: Vec<PathPart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathPart {
    AnyDepth,
    One(Glob),
}

impl PathGlob {
    pub(crate) fn new(text: &str) -> Result<PathGlob, String> {
        let parts = if text.is_empty() {
            Vec::new()
        } else {
            text.split('.')
                .map(|c| match c {
                    "**" => Ok(PathPart::AnyDepth),
                    _ if c.contains("**") => Err(format!(
                        "'{text}': '**' must be a whole component, as in 'a.**.b'"
                    )),
                    _ => Glob::new(c).map(PathPart::One),
                })
                .collect::<Result<_, _>>()?
        };
        Ok(PathGlob { parts })
    }

    pub(crate) fn matches(&self, components: &[&str]) -> bool {
        let mut row = vec![false; components.len() + 1];
        row[0] = true;
        for part in &self.parts {
            let mut next = vec![false; components.len() + 1];
            match part {
                PathPart::AnyDepth => {
                    let mut any = false;
                    for (j, slot) in next.iter_mut().enumerate() {
                        any |= row[j];
                        *slot = any;
                    }
                }
                PathPart::One(g) => {
                    for (j, c) in components.iter().enumerate() {
                        next[j + 1] = row[j] && g.matches(c);
                    }
                }
            }
            row = next;
        }
        row[components.len()]
    }
}

/// An axis permutation: a named pattern such as `O,I,*S -> *S,I,O` (`*S` captures
/// zero or more axes in place) or an explicit list such as `[1, 0]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PermSpec {
    Pattern(PermPattern),
    List(Vec<usize>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PermPattern {
    text: String,
    /// Source axes before the variadic group, the variadic group's name, axes after it.
    before: Vec<String>,
    rest: Option<String>,
    after: Vec<String>,
    /// The output order, as names (variadic name included once).
    output: Vec<String>,
}

impl PermSpec {
    /// Parses a named pattern.
    pub(crate) fn pattern(text: &str) -> Result<PermSpec, String> {
        PermPattern::parse(text).map(PermSpec::Pattern)
    }

    /// Checks an explicit list from a rule file.
    pub(crate) fn list(values: Vec<usize>) -> Result<PermSpec, String> {
        let mut seen = vec![false; values.len()];
        for &v in &values {
            match seen.get_mut(v) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(format!(
                        "perm {values:?} is not a permutation of 0..{}",
                        values.len()
                    ))
                }
            }
        }
        Ok(PermSpec::List(values))
    }

    /// The permutation for a tensor of `rank` axes: output axis `k` is source axis
    /// `perm[k]`. Errors (with a sentence for the caller to wrap) when the pattern does
    /// not fit the rank.
    pub(crate) fn resolve(&self, rank: usize) -> Result<Vec<usize>, String> {
        match self {
            PermSpec::List(list) if list.len() == rank => Ok(list.clone()),
            PermSpec::List(list) => Err(format!(
                "perm {list:?} needs rank {}, the tensor has rank {rank}",
                list.len()
            )),
            PermSpec::Pattern(p) => p.resolve(rank),
        }
    }
}

impl PermSpec {
    /// Sizes of the source axes a pattern names `name` (several for a `*` group), for a
    /// source of `shape`; `None` for lists, unknown names and shapes the pattern does
    /// not fit.
    pub(crate) fn axis_sizes(&self, shape: &[usize], name: &str) -> Option<Vec<usize>> {
        let PermSpec::Pattern(p) = self else {
            return None;
        };
        let fixed = p.before.len() + p.after.len();
        let rest_len = shape.len().checked_sub(fixed)?;
        let after_start = p.before.len() + rest_len;
        if let Some(i) = p.before.iter().position(|n| n == name) {
            return shape.get(i).map(|&n| vec![n]);
        }
        if let Some(i) = p.after.iter().position(|n| n == name) {
            return shape.get(after_start + i).map(|&n| vec![n]);
        }
        (p.rest.as_deref() == Some(name)).then(|| shape[p.before.len()..after_start].to_vec())
    }
}

impl fmt::Display for PermSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermSpec::List(list) => write!(f, "{list:?}"),
            PermSpec::Pattern(p) => f.write_str(&p.text),
        }
    }
}

enum Token<'a> {
    Axis(&'a str),
    Rest(&'a str),
}

fn tokens(side: &str) -> Result<Vec<Token<'_>>, String> {
    if side.trim().is_empty() {
        return Ok(Vec::new());
    }
    side.split(',')
        .map(|t| {
            let t = t.trim();
            let (rest, name) = match t.strip_prefix('*') {
                Some(n) => (true, n.trim_start()),
                None => (false, t),
            };
            if !is_ident(name) {
                return Err(format!(
                    "'{t}' is not an axis name (a letter or '_', then letters, digits, '_'; '*' in front for a group)"
                ));
            }
            Ok(if rest { Token::Rest(name) } else { Token::Axis(name) })
        })
        .collect()
}

impl PermPattern {
    fn parse(text: &str) -> Result<PermPattern, String> {
        let err = |why: String| format!("perm '{text}': {why}");
        let (left, right) = text
            .split_once("->")
            .ok_or_else(|| err("expected 'source axes -> output axes'".into()))?;
        if right.contains("->") {
            return Err(err("more than one '->'".into()));
        }
        let (left, right) = (tokens(left).map_err(err)?, tokens(right).map_err(err)?);

        let mut before = Vec::new();
        let mut rest = None;
        let mut after = Vec::new();
        let mut names: Vec<(&str, bool)> = Vec::new();
        for t in &left {
            let (name, is_rest) = match *t {
                Token::Axis(n) => (n, false),
                Token::Rest(n) => (n, true),
            };
            if names.iter().any(|(n, _)| *n == name) {
                return Err(err(format!("axis '{name}' named twice on the left")));
            }
            names.push((name, is_rest));
            match (is_rest, &rest) {
                (true, Some(_)) => return Err(err("more than one '*' group on the left".into())),
                (true, None) => rest = Some(name.to_string()),
                (false, None) => before.push(name.to_string()),
                (false, Some(_)) => after.push(name.to_string()),
            }
        }

        let mut output = Vec::new();
        for t in &right {
            let (name, is_rest) = match *t {
                Token::Axis(n) => (n, false),
                Token::Rest(n) => (n, true),
            };
            match names.iter().find(|(n, _)| *n == name) {
                None => return Err(err(format!("axis '{name}' is not on the left"))),
                Some(&(_, left_rest)) if left_rest != is_rest => {
                    return Err(err(format!(
                        "'{name}' must be written with '*' on both sides or on neither"
                    )))
                }
                Some(_) => {}
            }
            if output.iter().any(|n| n == name) {
                return Err(err(format!("axis '{name}' named twice on the right")));
            }
            output.push(name.to_string());
        }
        if output.len() != names.len() {
            let missing: Vec<&str> = names
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !output.iter().any(|o| o == n))
                .collect();
            return Err(err(format!(
                "axes {} are not on the right",
                missing.join(", ")
            )));
        }
        Ok(PermPattern {
            text: text.trim().to_string(),
            before,
            rest,
            after,
            output,
        })
    }

    fn resolve(&self, rank: usize) -> Result<Vec<usize>, String> {
        let fixed = self.before.len() + self.after.len();
        let fits = match self.rest {
            Some(_) => rank >= fixed,
            None => rank == fixed,
        };
        if !fits {
            let needs = match self.rest {
                Some(_) => format!("rank {fixed} or more"),
                None => format!("rank {fixed}"),
            };
            return Err(format!(
                "perm '{}' needs {needs}, the tensor has rank {rank}",
                self.text
            ));
        }
        // Ranks of the variadic group: everything not claimed by a named axis.
        let rest_len = rank - fixed;
        let after_start = self.before.len() + rest_len;
        let axes_of = |name: &str| -> Vec<usize> {
            if let Some(i) = self.before.iter().position(|n| n == name) {
                vec![i]
            } else if let Some(i) = self.after.iter().position(|n| n == name) {
                vec![after_start + i]
            } else {
                (self.before.len()..after_start).collect()
            }
        };
        Ok(self.output.iter().flat_map(|n| axes_of(n)).collect())
    }
}

/// A target name template: text with `{name}`, `{module}`, `{module_merged}` and
/// `{leaf}` placeholders (`{{` and `}}` for literal braces). Split at the dots of the
/// template; a dot-separated piece that renders empty is left out, so
/// `params.{module_merged}.{leaf}` gives `params.w` for a top-level `w`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    text: String,
    segments: Vec<Vec<Piece>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
    /// A component the rule's `tensor` pattern captured (`{layer}`).
    Capture(String),
    /// A value of the model's `config.json` (`{config.num_local_experts}`).
    Config(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    Name,
    Module,
    ModuleMerged,
    Leaf,
    Parent,
    ParentMerged,
    Part,
}

/// What a template reads from the model's `config.json`: the value of a dotted key as
/// text, or why there is none.
pub(crate) type ConfigText<'a> = &'a dyn Fn(&str) -> Result<String, String>;

const VARS: [(&str, Var); 7] = [
    ("name", Var::Name),
    ("module", Var::Module),
    ("module_merged", Var::ModuleMerged),
    ("leaf", Var::Leaf),
    ("parent", Var::Parent),
    ("parent_merged", Var::ParentMerged),
    ("part", Var::Part),
];

/// What a template is rendered from: one source tensor's name, split.
pub(crate) struct NameParts<'a> {
    pub name: &'a str,
    pub module: &'a str,
    pub module_merged: &'a str,
    pub leaf: &'a str,
    /// The module's module (all components but the last).
    pub parent: &'a str,
    pub parent_merged: &'a str,
    /// The name of the split part being rendered; empty outside a split.
    pub part: &'a str,
    /// What the rule's `tensor` pattern captured, by name.
    pub captures: &'a [(String, String)],
    /// The model's config values, when there is a config.
    pub config: Option<ConfigText<'a>>,
}

impl NameParts<'_> {
    /// `text` with every `{placeholder}` replaced: for messages, which, unlike targets,
    /// keep empty pieces and braces they do not know.
    pub(crate) fn fill(&self, text: &str) -> String {
        let known = VARS.iter().fold(text.to_string(), |acc, &(n, v)| {
            acc.replace(&format!("{{{n}}}"), self.get(v))
        });
        self.captures
            .iter()
            .fold(known, |acc, (n, v)| acc.replace(&format!("{{{n}}}"), v))
    }

    fn capture(&self, name: &str) -> &str {
        self.captures
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn get(&self, v: Var) -> &str {
        match v {
            Var::Name => self.name,
            Var::Module => self.module,
            Var::ModuleMerged => self.module_merged,
            Var::Leaf => self.leaf,
            Var::Parent => self.parent,
            Var::ParentMerged => self.parent_merged,
            Var::Part => self.part,
        }
    }
}

impl Template {
    /// A template with the built-in placeholders and `{config.KEY}` only.
    #[cfg(test)]
    pub(crate) fn new(text: &str) -> Result<Template, String> {
        Template::with_captures(text, &[])
    }

    /// A template that may also name the `captures` of the rule's `tensor` pattern.
    pub(crate) fn with_captures(text: &str, captures: &[String]) -> Result<Template, String> {
        let err = |why: String| format!("target '{text}': {why}");
        let mut segments = vec![Vec::new()];
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        let flush = |literal: &mut String, segments: &mut Vec<Vec<Piece>>| {
            if !literal.is_empty() {
                if let Some(seg) = segments.last_mut() {
                    seg.push(Piece::Text(std::mem::take(literal)));
                }
            }
        };
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut var = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => var.push(c),
                            None => return Err(err("'{' is never closed".into())),
                        }
                    }
                    let name = var.trim();
                    let piece = if let Some(key) = name.strip_prefix("config.") {
                        if key.is_empty() || key.split('.').any(str::is_empty) {
                            return Err(err(format!("'{{{var}}}' names no config key")));
                        }
                        Piece::Config(key.to_string())
                    } else if captures.iter().any(|c| c == name) {
                        Piece::Capture(name.to_string())
                    } else {
                        let v = VARS
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, v)| *v)
                            .ok_or_else(|| {
                                err(format!(
                                    "unknown placeholder '{{{var}}}' (known: {}, {{config.KEY}}{})",
                                    VARS.map(|(n, _)| format!("{{{n}}}")).join(", "),
                                    captures
                                        .iter()
                                        .map(|c| format!(", {{{c}}}"))
                                        .collect::<String>()
                                ))
                            })?;
                        Piece::Var(v)
                    };
                    flush(&mut literal, &mut segments);
                    if let Some(seg) = segments.last_mut() {
                        seg.push(piece);
                    }
                }
                '}' => {
                    return Err(err(
                        "'}' without '{' (write '}}' for a literal brace)".into()
                    ))
                }
                '.' => {
                    flush(&mut literal, &mut segments);
                    segments.push(Vec::new());
                }
                c => literal.push(c),
            }
        }
        flush(&mut literal, &mut segments);
        if segments.iter().all(|s| s.is_empty()) {
            return Err(err("is empty".into()));
        }
        Ok(Template {
            text: text.to_string(),
            segments,
        })
    }

    /// True when the template names the split part, so each part gets its own target.
    pub(crate) fn uses_part(&self) -> bool {
        self.segments
            .iter()
            .flatten()
            .any(|p| *p == Piece::Var(Var::Part))
    }

    /// True when the template names the capture `name`.
    pub(crate) fn uses_capture(&self, name: &str) -> bool {
        self.segments
            .iter()
            .flatten()
            .any(|p| matches!(p, Piece::Capture(c) if c == name))
    }

    /// The config keys the template reads.
    pub(crate) fn config_keys(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().flatten().filter_map(|p| match p {
            Piece::Config(k) => Some(k.as_str()),
            _ => None,
        })
    }

    /// The rendered name; an error when a `{config.KEY}` has no value.
    pub(crate) fn render(&self, parts: &NameParts<'_>) -> Result<String, String> {
        let mut out = String::new();
        for seg in &self.segments {
            let mut piece = String::new();
            for p in seg {
                match p {
                    Piece::Text(t) => piece.push_str(t),
                    Piece::Var(v) => piece.push_str(parts.get(*v)),
                    Piece::Capture(c) => piece.push_str(parts.capture(c)),
                    Piece::Config(key) => match parts.config {
                        Some(lookup) => piece.push_str(&lookup(key)?),
                        None => {
                            return Err(format!(
                            "'{{config.{key}}}' needs the model's config.json, and there is none"
                        ))
                        }
                    },
                }
            }
            if !piece.is_empty() {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&piece);
            }
        }
        Ok(out)
    }
}

/// A whole tensor name with named captures, `model.layers.{layer}.mlp.experts.{e}.w1.weight`:
/// text matches itself, `{x}` one or more characters inside one dot-separated component,
/// `{*x}` one or more whole components (`transformer.{*rest}`). Two captures must be
/// separated by text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorPattern {
    text: String,
    pieces: Vec<NamePiece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NamePiece {
    Text(String),
    /// A capture, and whether it spans whole components, dots included (`{*rest}`).
    Capture(String, bool),
}

/// Most captures one pattern may hold.
const MAX_CAPTURES: usize = 8;

impl TensorPattern {
    pub(crate) fn new(text: &str) -> Result<TensorPattern, String> {
        let err = |why: &str| format!("tensor pattern '{text}': {why}");
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest.find('}').ok_or_else(|| err("'{' is never closed"))?;
                    let inner = rest[1..end].trim();
                    let (name, multi) = match inner.strip_prefix('*') {
                        Some(n) => (n.trim(), true),
                        None => (inner, false),
                    };
                    let ok = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return Err(err(&format!(
                            "'{{{name}}}' is not a capture name (letters, digits, '_')"
                        )));
                    }
                    if VARS.iter().any(|(n, _)| *n == name) || name == "config" {
                        return Err(err(&format!(
                            "'{{{name}}}' is a built-in placeholder; name the capture otherwise"
                        )));
                    }
                    if matches!(pieces.last(), Some(NamePiece::Capture(..))) {
                        return Err(err("two captures need text between them"));
                    }
                    if pieces
                        .iter()
                        .any(|p| matches!(p, NamePiece::Capture(c, _) if c == name))
                    {
                        return Err(err(&format!("'{{{name}}}' is captured twice")));
                    }
                    pieces.push(NamePiece::Capture(name.to_string(), multi));
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    if rest[..end].contains('}') {
                        return Err(err("'}' without '{'"));
                    }
                    pieces.push(NamePiece::Text(rest[..end].to_string()));
                    rest = &rest[end..];
                }
            }
        }
        if pieces.is_empty() {
            return Err(err("is empty"));
        }
        if pieces.len() > 2 * MAX_CAPTURES + 1 {
            return Err(err(&format!("holds more than {MAX_CAPTURES} captures")));
        }
        Ok(TensorPattern {
            text: text.to_string(),
            pieces,
        })
    }

    /// The capture names, in order.
    pub(crate) fn captures(&self) -> Vec<String> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                NamePiece::Capture(c, _) => Some(c.clone()),
                NamePiece::Text(_) => None,
            })
            .collect()
    }

    /// The captures when `name` matches, in order.
    pub(crate) fn matches(&self, name: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        match_pieces(&self.pieces, name, &mut out).then_some(out)
    }
}

/// Backtracking over the pieces; a capture never crosses a '.' (a `{*x}` one spans whole
/// components: it starts and ends at a component boundary), and captures are separated
/// by text.
fn match_pieces(pieces: &[NamePiece], name: &str, out: &mut Vec<(String, String)>) -> bool {
    match pieces.split_first() {
        None => name.is_empty(),
        Some((NamePiece::Text(t), rest)) => name
            .strip_prefix(t.as_str())
            .is_some_and(|tail| match_pieces(rest, tail, out)),
        Some((NamePiece::Capture(c, multi), rest)) => {
            let limit = if *multi {
                name.len()
            } else {
                name.find('.').unwrap_or(name.len())
            };
            for len in 1..=limit {
                if *multi && name.as_bytes().get(len).is_some_and(|&b| b != b'.') {
                    continue;
                }
                out.push((c.clone(), name[..len].to_string()));
                if match_pieces(rest, &name[len..], out) {
                    return true;
                }
                out.pop();
            }
            false
        }
    }
}

impl fmt::Display for TensorPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A reshape of the permuted tensor: comma-separated dimensions, each an axis name of
/// the rule's perm pattern (its size in the source; a `*` group gives all of its axes),
/// a `{variable}` set with `--set`, a positive integer, or `-1` (at most once: whatever
/// is left of the element count). `"I, {heads}, -1"` splits a Linear's output axis into
/// heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReshapeSpec {
    text: String,
    dims: Vec<Dim>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Dim {
    Axis(String),
    Var(String),
    Fixed(usize),
    Infer,
}

impl ReshapeSpec {
    pub(crate) fn new(text: &str) -> Result<ReshapeSpec, String> {
        let err = |why: String| format!("reshape '{text}': {why}");
        let mut dims = Vec::new();
        if !text.trim().is_empty() {
            for item in text.split(',') {
                let item = item.trim();
                let dim = if item == "-1" {
                    Dim::Infer
                } else if let Some(var) = item.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                    if !is_ident(var) {
                        return Err(err(format!("'{item}' is not a variable name")));
                    }
                    Dim::Var(var.to_string())
                } else if item.bytes().all(|b| b.is_ascii_digit()) && !item.is_empty() {
                    Dim::Fixed(
                        item.parse()
                            .map_err(|_| err(format!("'{item}' is too large")))?,
                    )
                } else if is_ident(item.trim_start_matches('*')) {
                    Dim::Axis(item.trim_start_matches('*').to_string())
                } else {
                    return Err(err(format!(
                        "'{item}' is not an axis name, {{variable}}, integer or -1"
                    )));
                };
                dims.push(dim);
            }
        }
        if dims.iter().filter(|d| **d == Dim::Infer).count() > 1 {
            return Err(err("more than one -1".into()));
        }
        Ok(ReshapeSpec {
            text: text.trim().to_string(),
            dims,
        })
    }

    /// Variables the reshape reads.
    pub(crate) fn variables(&self) -> impl Iterator<Item = &str> {
        self.dims.iter().filter_map(|d| match d {
            Dim::Var(v) => Some(v.as_str()),
            _ => None,
        })
    }

    /// The target shape for a tensor of `numel` elements whose (sliced) source shape is
    /// `source` under `perm`; `var` looks up `--set` values.
    pub(crate) fn resolve(
        &self,
        numel: usize,
        source: &[usize],
        perm: Option<&PermSpec>,
        var: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Vec<usize>, String> {
        let err = |why: String| format!("reshape '{}': {why}", self.text);
        let mut shape = Vec::with_capacity(self.dims.len());
        let mut infer_at = None;
        for d in &self.dims {
            match d {
                Dim::Fixed(n) => shape.push(*n),
                Dim::Var(v) => {
                    shape.push(var(v).ok_or_else(|| {
                        err(format!("variable '{v}' is not set (pass --set {v}=N)"))
                    })?)
                }
                Dim::Axis(a) => {
                    shape.extend(perm.and_then(|p| p.axis_sizes(source, a)).ok_or_else(|| {
                        err(format!("'{a}' is not an axis of the rule's perm pattern"))
                    })?)
                }
                Dim::Infer => {
                    infer_at = Some(shape.len());
                    shape.push(1);
                }
            }
        }
        let known = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| err(format!("{shape:?} overflows")))?;
        if let Some(at) = infer_at {
            if known == 0 || numel % known != 0 {
                return Err(err(format!(
                    "{numel} elements do not divide into dimensions of product {known}"
                )));
            }
            shape[at] = numel / known;
        } else if known != numel {
            return Err(err(format!(
                "shape {shape:?} holds {known} elements, the tensor {numel}"
            )));
        }
        Ok(shape)
    }
}

impl fmt::Display for ReshapeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Merges every all-digit component into the one before it with `_`
/// (`layer1.0.conv1` → `layer1_0.conv1`), as Flax names list items; a leading
/// all-digit component has nothing to merge into and stays.
pub(crate) fn merge_digits(components: &[&str]) -> String {
    let mut out: Vec<String> = Vec::with_capacity(components.len());
    for &c in components {
        let digits = !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit());
        match out.last_mut() {
            Some(prev) if digits => {
                prev.push('_');
                prev.push_str(c);
            }
            _ => out.push(c.to_string()),
        }
    }
    out.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_stars_and_question_marks_within_one_component() {
        let g = Glob::new("conv*").unwrap();
        assert!(g.matches("conv") && g.matches("conv1") && !g.matches("xconv"));
        let g = Glob::new("*bn?").unwrap();
        assert!(g.matches("bn1") && g.matches("subbn2") && !g.matches("bn") && !g.matches("bn12"));
        let g = Glob::new("a*b*c").unwrap();
        assert!(g.matches("abc") && g.matches("aXbYc") && !g.matches("aXcYb"));
        assert!(Glob::new("").unwrap().matches(""));
        assert!(Glob::new("a.b").is_err());
    }

    #[test]
    fn path_glob_matches_whole_components_only() {
        let comps = |s: &str| -> Vec<String> {
            if s.is_empty() {
                vec![]
            } else {
                s.split('.').map(String::from).collect()
            }
        };
        let m = |pat: &str, path: &str| {
            let c = comps(path);
            let c: Vec<&str> = c.iter().map(String::as_str).collect();
            PathGlob::new(pat).unwrap().matches(&c)
        };
        assert!(m("**", "") && m("**", "a.b.c"));
        assert!(m("", "") && !m("", "a"));
        assert!(m("**.downsample.*", "layer1.0.downsample.1"));
        assert!(!m("**.downsample.*", "layer1.0.downsample"));
        assert!(m("layer*.**", "layer1") && m("layer*.**", "layer1.0.conv1"));
        assert!(!m("bn", "subnet") && !m("**.bn*", "subnet.conv"));
        assert!(m("a.**.b", "a.b") && m("a.**.b", "a.x.y.b") && !m("a.**.b", "a.x.y"));
        assert!(PathGlob::new("a**").is_err());
    }

    #[test]
    fn perm_pattern_resolves_variadic_groups_for_every_rank() {
        let p = PermSpec::pattern("O,I,*S -> *S,I,O").unwrap();
        assert_eq!(p.resolve(2).unwrap(), vec![1, 0]);
        assert_eq!(p.resolve(3).unwrap(), vec![2, 1, 0]);
        assert_eq!(p.resolve(5).unwrap(), vec![2, 3, 4, 1, 0]);
        assert!(p.resolve(1).is_err());
        let p = PermSpec::pattern("O, I, *S -> O, *S, I").unwrap();
        assert_eq!(p.resolve(4).unwrap(), vec![0, 2, 3, 1]);
        let p = PermSpec::pattern("*B, H, W -> W, H, *B").unwrap();
        assert_eq!(p.resolve(4).unwrap(), vec![3, 2, 0, 1]);
        let p = PermSpec::pattern("A,B -> B,A").unwrap();
        assert_eq!(p.resolve(2).unwrap(), vec![1, 0]);
        assert!(p.resolve(3).is_err());
        assert_eq!(
            PermSpec::pattern(" -> ").unwrap().resolve(0).unwrap(),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn perm_pattern_rejects_malformed_text() {
        for bad in [
            "O,I",
            "O,I -> I",
            "O,I -> I,O,X",
            "O,O -> O,O",
            "O,I -> I,I",
            "*A,*B -> *A,*B",
            "O,*S -> S,O",
            "O,1x -> 1x,O",
            "O,,I -> I,O",
            "A -> A -> A",
        ] {
            assert!(PermSpec::pattern(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn perm_list_must_be_a_permutation() {
        assert_eq!(
            PermSpec::list(vec![1, 0]).unwrap().resolve(2).unwrap(),
            vec![1, 0]
        );
        assert!(PermSpec::list(vec![1, 0]).unwrap().resolve(3).is_err());
        assert!(PermSpec::list(vec![0, 0]).is_err());
        assert!(PermSpec::list(vec![0, 2]).is_err());
    }

    #[test]
    fn template_drops_empty_dot_pieces_and_keeps_braces() {
        let parts = NameParts {
            name: "w",
            module: "",
            module_merged: "",
            leaf: "w",
            parent: "",
            parent_merged: "",
            part: "",
            captures: &[],
            config: None,
        };
        let t = Template::new("params.{module_merged}.{leaf}").unwrap();
        assert_eq!(t.render(&parts).unwrap(), "params.w");
        let t = Template::new("{{x}}.{ leaf }").unwrap();
        assert_eq!(t.render(&parts).unwrap(), "{x}.w");
        let parts = NameParts {
            name: "a.0.b.w",
            module: "a.0.b",
            module_merged: "a_0.b",
            leaf: "w",
            parent: "a.0",
            parent_merged: "a_0",
            part: "key",
            captures: &[],
            config: None,
        };
        let t = Template::new("p.{module}.{module_merged}.{leaf}_x").unwrap();
        assert_eq!(t.render(&parts).unwrap(), "p.a.0.b.a_0.b.w_x");
        let t = Template::new("{parent}.{parent_merged}.{part}").unwrap();
        assert_eq!(t.render(&parts).unwrap(), "a.0.a_0.key");
        assert!(t.uses_part());
        assert_eq!(
            parts.fill("at '{parent}' {unknown} {{part}}"),
            "at 'a.0' {unknown} {key}"
        );
        for bad in ["{nope}", "{leaf", "leaf}", "", "..", "a.{module_last}"] {
            assert!(Template::new(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn merge_digits_folds_list_indices_into_their_parent() {
        assert_eq!(merge_digits(&["layer1", "0", "conv1"]), "layer1_0.conv1");
        assert_eq!(merge_digits(&["blocks", "1", "2"]), "blocks_1_2");
        assert_eq!(merge_digits(&["0", "fc"]), "0.fc");
        assert_eq!(merge_digits(&["0", "1"]), "0_1");
        assert_eq!(merge_digits(&["x1", "a0"]), "x1.a0");
        assert_eq!(merge_digits(&[]), "");
    }

    #[test]
    fn tensor_patterns_capture_whole_pieces_of_components() {
        let p = TensorPattern::new("model.layers.{layer}.mlp.experts.{e}.w1.weight").unwrap();
        assert_eq!(p.captures(), ["layer", "e"]);
        let got = p
            .matches("model.layers.12.mlp.experts.3.w1.weight")
            .unwrap();
        assert_eq!(
            got,
            [
                ("layer".to_string(), "12".to_string()),
                ("e".to_string(), "3".to_string())
            ]
        );
        assert!(p
            .matches("model.layers.1.2.mlp.experts.3.w1.weight")
            .is_none());
        assert!(p
            .matches("model.layers.1.mlp.experts.3.w1.weight.x")
            .is_none());
        assert!(p.matches("model.layers..mlp.experts.3.w1.weight").is_none());
        let r = TensorPattern::new("transformer.{*rest}").unwrap();
        assert_eq!(
            r.matches("transformer.h.0.attn.w").unwrap()[0].1,
            "h.0.attn.w"
        );
        assert!(r.matches("transformer.").is_none());
        let m = TensorPattern::new("{*pre}.experts.{e}.w").unwrap();
        assert_eq!(m.matches("a.b.experts.3.w").unwrap()[0].1, "a.b");
        assert!(m.matches("a.bexperts.3.w").is_none());
        let q = TensorPattern::new("h.{i}_x.{j}").unwrap();
        assert_eq!(q.matches("h.a_x_x.b").unwrap()[0].1, "a_x");
        for bad in [
            "", "a.{", "a.}", "{a}{b}", "{x}.{x}", "{leaf}.w", "{a-b}", "{}",
        ] {
            assert!(TensorPattern::new(bad).is_err(), "{bad} accepted");
        }
        let t = Template::with_captures("m.{layer}.{config.n}.{leaf}", &p.captures()).unwrap();
        assert!(t.uses_capture("layer") && !t.uses_capture("e"));
        assert_eq!(t.config_keys().collect::<Vec<_>>(), ["n"]);
        assert!(Template::new("m.{layer}").is_err());
        assert!(Template::new("m.{config.}").is_err());
        let caps = [("layer".to_string(), "4".to_string())];
        let lookup = |k: &str| -> Result<String, String> {
            if k == "n" {
                Ok("8".into())
            } else {
                Err(format!("no {k}"))
            }
        };
        let parts = NameParts {
            name: "a.w",
            module: "a",
            module_merged: "a",
            leaf: "w",
            parent: "",
            parent_merged: "",
            part: "",
            captures: &caps,
            config: Some(&lookup),
        };
        assert_eq!(t.render(&parts).unwrap(), "m.4.8.w");
        let missing = Template::new("{config.other}").unwrap();
        assert!(missing.render(&parts).unwrap_err().contains("no other"));
    }
}
