//! Templates of `files`: minijinja with no loader, no functions, no
//! environment, file, network or clock access. Work and memory are bounded
//! by minijinja's fuel, which charges every instruction and every byte a
//! template makes or reads (checked before large allocations); output by
//! the file's byte limit; coffer's own filters also charge a per-render
//! byte budget before they allocate. What is not needed and only widens the
//! surface is refused when the template is compiled: calls, `*`, `**`,
//! recursive loops, `do`, and any filter or test not listed here.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use minijinja::machinery::ast::{BinOpKind, CallArg, Expr, Stmt};
use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};

use crate::secret::SecretBuf;

/// Template text per file.
pub const MAX_TEMPLATE_BYTES: usize = 16 * 1024;
/// Fuel of one render: one per instruction and one per 64 bytes made or
/// read, so ~6 MB of data in all. A pgpass line takes ~30; a 1 MiB file
/// read and written whole ~33,000. It also bounds a render's memory: what a
/// template builds is charged before it is allocated.
pub const FUEL: u64 = 100_000;
/// Bytes the filters of one render may produce in all.
pub const WORK_BUDGET: usize = 8 * 1024 * 1024;
/// Largest value a template may read.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// Nesting of loops and conditions at run time.
const RECURSION_LIMIT: usize = 64;

/// Filters a template may use; each is bounded (see `add_filters`).
pub const FILTERS: &[&str] = &[
    "default",
    "d",
    "upper",
    "lower",
    "trim",
    "length",
    "count",
    "first",
    "last",
    "tojson",
    "items",
    "join",
    "replace",
    "b64encode",
    "b64decode",
    "urlencode",
    "pgpass",
];
/// Tests a template may use.
const TESTS: &[&str] = &[
    "defined",
    "undefined",
    "none",
    "string",
    "number",
    "mapping",
    "sequence",
    "startingwith",
    "endingwith",
    "true",
    "false",
];

/// The name under which every object is reachable, whatever its name.
pub const OBJECTS_VAR: &str = "objects";

/// What a template reads, found when it is compiled.
#[derive(Debug, Default, Clone)]
pub struct Reads {
    /// Top-level names (objects named like identifiers, or `objects`).
    pub names: BTreeSet<String>,
    /// Objects read as `objects["name"]`.
    pub by_key: BTreeSet<String>,
    /// `objects` is used other than with a constant key: any object.
    pub any: bool,
}

/// The compiled templates of one `files` list.
pub struct Templates {
    env: Environment<'static>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::empty();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        // Error display would list the template's variables: never on.
        env.set_debug(false);
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        add_filters(&mut env);
        add_tests(&mut env);
        Self { env }
    }

    /// Checks and compiles one template under `name`.
    pub fn add(&mut self, name: &str, source: &str) -> Result<Reads, String> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(format!(
                "the template is {} bytes; at most {MAX_TEMPLATE_BYTES} are allowed",
                source.len()
            ));
        }
        let ast = minijinja::machinery::parse(source, name, self.env.syntax().clone())
            .map_err(|e| syntax_message(&e))?;
        let mut reads = Reads::default();
        check_stmt(&ast, &mut reads)?;
        self.env
            .add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| syntax_message(&e))?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| syntax_message(&e))?;
        reads.names = template.undeclared_variables(false).into_iter().collect();
        Ok(reads)
    }

    /// Renders template `name` into a buffer of at most `limit` bytes.
    pub fn render(&self, name: &str, root: Value, limit: usize) -> Result<SecretBuf, String> {
        let template = self
            .env
            .get_template(name)
            .map_err(|e| syntax_message(&e))?;
        let mut out = SecretBuf::with_limit(limit);
        BUDGET.with(|b| b.set(WORK_BUDGET));
        let result = template.render_captured_to(root, &mut out);
        match result {
            Ok(_) => Ok(out),
            Err(e) => Err(render_message(&e, template.source(), limit)),
        }
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

fn line_of(e: &Error) -> String {
    e.line().map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// Syntax errors quote the template, which is SPC text, never a value.
fn syntax_message(e: &Error) -> String {
    format!(
        "template {}{}",
        e.detail().unwrap_or("syntax error"),
        line_of(e)
    )
}

/// Messages of a failed render: the kind, the line and the template text
/// at fault; never a detail minijinja built from a value.
fn render_message(e: &Error, source: &str, limit: usize) -> String {
    let at = e
        .range()
        .and_then(|r| source.get(r))
        .filter(|s| s.len() <= 120)
        .map(|s| format!(" in {}", crate::error::shown(s.trim())))
        .unwrap_or_default();
    let line = line_of(e);
    match e.kind() {
        ErrorKind::UndefinedError => format!(
            "template reads an undefined value{at}{line}: a missing object or key (use `is defined` or `default(...)` where it may be absent)"
        ),
        ErrorKind::OutOfFuel => {
            format!("template ran out of fuel: more than {FUEL} steps{line}")
        }
        ErrorKind::WriteFailure => format!("template output exceeds {limit} bytes{line}"),
        ErrorKind::InvalidOperation
            if e.detail().is_some_and(|d| d.starts_with(OWN)) =>
        {
            format!(
                "template {}{at}{line}",
                e.detail().unwrap_or_default().trim_start_matches(OWN)
            )
        }
        kind => format!("template failed: {kind}{at}{line}"),
    }
}

/// Marks error details coffer wrote (they hold no value).
const OWN: &str = "coffer: ";

fn own(detail: impl fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{OWN}{detail}"))
}

fn refuse(what: &str, span: minijinja::machinery::Span) -> String {
    format!(
        "template uses {what} (line {}), which coffer's templates do not allow",
        span.start_line
    )
}

fn check_stmts(stmts: &[Stmt<'_>], reads: &mut Reads) -> Result<(), String> {
    stmts.iter().try_for_each(|s| check_stmt(s, reads))
}

fn check_stmt(stmt: &Stmt<'_>, reads: &mut Reads) -> Result<(), String> {
    match stmt {
        Stmt::Template(t) => check_stmts(&t.children, reads),
        Stmt::EmitExpr(e) => check_expr(&e.expr, reads),
        Stmt::EmitRaw(_) => Ok(()),
        Stmt::ForLoop(f) => {
            if f.recursive {
                return Err(refuse("a recursive loop", f.span()));
            }
            // The target (`k, v`) names loop variables; nothing to check.
            check_expr(&f.iter, reads)?;
            if let Some(e) = &f.filter_expr {
                check_expr(e, reads)?;
            }
            check_stmts(&f.body, reads)?;
            check_stmts(&f.else_body, reads)
        }
        Stmt::IfCond(i) => {
            check_expr(&i.expr, reads)?;
            check_stmts(&i.true_body, reads)?;
            check_stmts(&i.false_body, reads)
        }
        Stmt::AutoEscape(a) => check_stmts(&a.body, reads),
        Stmt::FilterBlock(f) => {
            check_expr(&f.filter, reads)?;
            check_stmts(&f.body, reads)
        }
        Stmt::WithBlock(w) => {
            for (_, value) in &w.assignments {
                check_expr(value, reads)?;
            }
            check_stmts(&w.body, reads)
        }
        Stmt::Set(s) => check_expr(&s.expr, reads),
        Stmt::SetBlock(s) => {
            if let Some(f) = &s.filter {
                check_expr(f, reads)?;
            }
            check_stmts(&s.body, reads)
        }
        Stmt::Do(d) => Err(refuse("`do`", d.span())),
        #[allow(unreachable_patterns)]
        _ => Err("template uses a statement coffer's templates do not allow (macros, includes, imports and blocks are not available)".into()),
    }
}

fn check_args(args: &[CallArg<'_>], constant: bool, reads: &mut Reads) -> Result<(), String> {
    for arg in args {
        let e = match arg {
            CallArg::Pos(e) | CallArg::Kwarg(_, e) => e,
            CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
                return Err(refuse("argument unpacking", span_of(e)));
            }
        };
        if constant && !matches!(e, Expr::Const(_)) {
            return Err(format!(
                "template passes a computed argument to a filter (line {}); filter arguments must be literals, except default's",
                span_of(e).start_line
            ));
        }
        check_expr(e, reads)?;
    }
    Ok(())
}

fn span_of(e: &Expr<'_>) -> minijinja::machinery::Span {
    match e {
        Expr::Var(x) => x.span(),
        Expr::Const(x) => x.span(),
        Expr::Slice(x) => x.span(),
        Expr::UnaryOp(x) => x.span(),
        Expr::BinOp(x) => x.span(),
        Expr::Compare(x) => x.span(),
        Expr::IfExpr(x) => x.span(),
        Expr::Filter(x) => x.span(),
        Expr::Test(x) => x.span(),
        Expr::GetAttr(x) => x.span(),
        Expr::GetItem(x) => x.span(),
        Expr::Call(x) => x.span(),
        Expr::List(x) => x.span(),
        Expr::Tuple(x) => x.span(),
        Expr::Map(x) => x.span(),
    }
}

fn check_expr(expr: &Expr<'_>, reads: &mut Reads) -> Result<(), String> {
    match expr {
        Expr::Var(v) => {
            if v.id == OBJECTS_VAR {
                reads.any = true;
            }
            Ok(())
        }
        Expr::Const(_) => Ok(()),
        Expr::Slice(s) => {
            check_expr(&s.expr, reads)?;
            for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                check_expr(e, reads)?;
            }
            Ok(())
        }
        Expr::UnaryOp(u) => check_expr(&u.expr, reads),
        Expr::BinOp(b) => {
            let what = match b.op {
                BinOpKind::Mul => Some("`*`"),
                BinOpKind::Pow => Some("`**`"),
                _ => None,
            };
            if let Some(what) = what {
                return Err(refuse(what, b.span()));
            }
            check_expr(&b.left, reads)?;
            check_expr(&b.right, reads)
        }
        Expr::Compare(c) => {
            check_expr(&c.expr, reads)?;
            c.ops.iter().try_for_each(|op| check_expr(&op.expr, reads))
        }
        Expr::IfExpr(i) => {
            check_expr(&i.test_expr, reads)?;
            check_expr(&i.true_expr, reads)?;
            i.false_expr
                .as_ref()
                .map_or(Ok(()), |e| check_expr(e, reads))
        }
        Expr::Filter(f) => {
            if !FILTERS.contains(&f.name) {
                return Err(format!(
                    "template uses filter {} (line {}); available: {}",
                    crate::error::shown(f.name),
                    f.span().start_line,
                    FILTERS.join(", ")
                ));
            }
            if let Some(e) = &f.expr {
                check_expr(e, reads)?;
            }
            check_args(&f.args, !matches!(f.name, "default" | "d"), reads)
        }
        Expr::Test(t) => {
            if !TESTS.contains(&t.name) {
                return Err(format!(
                    "template uses test {} (line {}); available: {}",
                    crate::error::shown(t.name),
                    t.span().start_line,
                    TESTS.join(", ")
                ));
            }
            check_expr(&t.expr, reads)?;
            check_args(&t.args, true, reads)
        }
        Expr::GetAttr(g) => check_expr(&g.expr, reads),
        Expr::GetItem(g) => {
            // `objects["db/creds"]`: a known object, not any.
            if let (Expr::Var(v), Expr::Const(k)) = (&g.expr, &g.subscript_expr) {
                if v.id == OBJECTS_VAR {
                    if let Some(name) = k.value.as_str() {
                        reads.by_key.insert(name.to_string());
                        return Ok(());
                    }
                }
            }
            check_expr(&g.expr, reads)?;
            check_expr(&g.subscript_expr, reads)
        }
        Expr::Call(c) => Err(refuse("a function or method call", c.span())),
        Expr::List(l) => l.items.iter().try_for_each(|e| check_expr(e, reads)),
        Expr::Tuple(t) => t.items.iter().try_for_each(|e| check_expr(e, reads)),
        Expr::Map(m) => m
            .keys
            .iter()
            .chain(m.values.iter())
            .try_for_each(|e| check_expr(e, reads)),
    }
}

thread_local! {
    /// Bytes the filters of the current render may still produce.
    static BUDGET: Cell<usize> = const { Cell::new(0) };
}

/// Takes `n` bytes from the render's budget, before they are allocated.
fn charge(n: usize) -> Result<(), Error> {
    BUDGET.with(|b| match b.get().checked_sub(n) {
        Some(left) => {
            b.set(left);
            Ok(())
        }
        None => Err(budget_error()),
    })
}

/// The text of a value as the template prints it, built within the budget.
fn text_of(v: &Value) -> Result<String, Error> {
    if let Some(s) = v.as_str() {
        charge(s.len())?;
        return Ok(s.to_string());
    }
    let mut out = Bounded::default();
    fmt::write(&mut out, format_args!("{v}")).map_err(|_| budget_error())?;
    Ok(out.0)
}

/// A `fmt::Write` that charges the budget as it grows.
#[derive(Default)]
struct Bounded(String);

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        charge(s.len()).map_err(|_| fmt::Error)?;
        self.0.push_str(s);
        Ok(())
    }
}

fn add_filters(env: &mut Environment<'static>) {
    use minijinja::filters;
    env.add_filter("default", filters::default);
    env.add_filter("d", filters::default);
    env.add_filter("length", filters::length);
    env.add_filter("count", filters::length);
    env.add_filter("first", filters::first);
    env.add_filter("last", filters::last);
    env.add_filter("upper", |v: &Value| -> Result<String, Error> {
        let s = text_of(v)?;
        charge(s.len() * 2)?;
        Ok(s.to_uppercase())
    });
    env.add_filter("lower", |v: &Value| -> Result<String, Error> {
        let s = text_of(v)?;
        charge(s.len() * 2)?;
        Ok(s.to_lowercase())
    });
    env.add_filter("trim", |v: &Value| -> Result<String, Error> {
        Ok(text_of(v)?.trim().to_string())
    });
    env.add_filter("tojson", |v: &Value| -> Result<Value, Error> {
        let mut out = Bounded::default();
        let json = serde_json::to_string(&Budgeted(v)).map_err(|_| budget_error())?;
        fmt::Write::write_str(&mut out, &json).map_err(|_| budget_error())?;
        Ok(Value::from_safe_string(out.0))
    });
    env.add_filter("items", |v: &Value| -> Result<Value, Error> {
        let mut pairs = Vec::new();
        for key in v.try_iter()? {
            let value = v.get_item(&key)?;
            pairs.push(Value::from(vec![key, value]));
        }
        Ok(Value::from(pairs))
    });
    env.add_filter(
        "join",
        |v: &Value, sep: Option<String>| -> Result<String, Error> {
            let sep = sep.unwrap_or_default();
            let mut out = Bounded::default();
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    fmt::Write::write_str(&mut out, &sep).map_err(|_| budget_error())?;
                }
                fmt::write(&mut out, format_args!("{item}")).map_err(|_| budget_error())?;
            }
            Ok(out.0)
        },
    );
    env.add_filter(
        "replace",
        |v: &Value, from: String, to: String| -> Result<String, Error> {
            let s = text_of(v)?;
            if from.is_empty() {
                return Err(own("replace needs a non-empty text to replace"));
            }
            let n = s.matches(from.as_str()).count();
            let size = s.len() - n * from.len() + n * to.len();
            charge(size)?;
            Ok(s.replace(from.as_str(), &to))
        },
    );
    env.add_filter("b64encode", |v: &Value| -> Result<String, Error> {
        use base64::Engine as _;
        let s = text_of(v)?;
        charge(s.len() / 3 * 4 + 4)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
    });
    env.add_filter("b64decode", |v: &Value| -> Result<String, Error> {
        use base64::Engine as _;
        let s = text_of(v)?;
        charge(s.len())?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim().as_bytes())
            .map_err(|_| own("b64decode: the value is not valid base64"))?;
        String::from_utf8(bytes).map_err(|_| own("b64decode: the decoded value is not UTF-8 text"))
    });
    // A field of a PostgreSQL password file: `\` and `:` escaped.
    env.add_filter("pgpass", |v: &Value| -> Result<String, Error> {
        let s = text_of(v)?;
        charge(s.len() * 2)?;
        Ok(s.replace('\\', "\\\\").replace(':', "\\:"))
    });
    env.add_filter("urlencode", |v: &Value| -> Result<String, Error> {
        let s = text_of(v)?;
        charge(s.len() * 3)?;
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        Ok(out)
    });
}

fn budget_error() -> Error {
    own(format!("filters produced more than {WORK_BUDGET} bytes"))
}

/// Serializes a template value as JSON, charging the budget per string.
struct Budgeted<'a>(&'a Value);

impl serde::Serialize for Budgeted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap, SerializeSeq};
        let v = self.0;
        let over = || S::Error::custom("budget");
        if let Some(text) = v.as_str() {
            charge(text.len() + 2).map_err(|_| over())?;
            return s.serialize_str(text);
        }
        match v.kind() {
            minijinja::value::ValueKind::Undefined | minijinja::value::ValueKind::None => {
                s.serialize_unit()
            }
            minijinja::value::ValueKind::Bool => s.serialize_bool(v.is_true()),
            minijinja::value::ValueKind::Number => {
                if let Some(i) = v.as_i64() {
                    s.serialize_i64(i)
                } else {
                    s.serialize_f64(f64::try_from(v.clone()).unwrap_or(f64::NAN))
                }
            }
            minijinja::value::ValueKind::Map => {
                let keys: Vec<Value> = v.try_iter().map_err(|_| over())?.collect();
                let mut m = s.serialize_map(Some(keys.len()))?;
                for k in keys {
                    let item = v.get_item(&k).map_err(|_| over())?;
                    let key = k.to_string();
                    charge(key.len() + 4).map_err(|_| over())?;
                    m.serialize_entry(&key, &Budgeted(&item))?;
                }
                m.end()
            }
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter().map_err(|_| over())?.collect();
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in &items {
                    charge(1).map_err(|_| over())?;
                    seq.serialize_element(&Budgeted(item))?;
                }
                seq.end()
            }
            _ => {
                let text = text_of(v).map_err(|_| over())?;
                s.serialize_str(&text)
            }
        }
    }
}

fn add_tests(env: &mut Environment<'static>) {
    use minijinja::tests;
    env.add_test("defined", tests::is_defined);
    env.add_test("undefined", tests::is_undefined);
    env.add_test("none", tests::is_none);
    env.add_test("string", tests::is_string);
    env.add_test("number", tests::is_number);
    env.add_test("mapping", tests::is_mapping);
    env.add_test("sequence", tests::is_sequence);
    env.add_test("startingwith", tests::is_startingwith);
    env.add_test("endingwith", tests::is_endingwith);
    env.add_test("true", tests::is_true);
    env.add_test("false", tests::is_false);
}

/// A map-valued object: its keys are addressable, and printed whole it is
/// its raw text (the secret as stored), not a rendering of the map.
#[derive(Debug)]
pub struct MapValue {
    raw: String,
    map: BTreeMap<String, Value>,
}

impl MapValue {
    pub fn new(raw: &str, map: &serde_json::Map<String, serde_json::Value>) -> Self {
        Self {
            raw: raw.to_string(),
            map: map
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(minijinja::value::Serde(v))))
                .collect(),
        }
    }
}

impl Drop for MapValue {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.raw);
    }
}

impl Object for MapValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.map.get(key.as_str()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.map.keys().map(|k| Value::from(k.as_str()))))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.map.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(pairs: &[(&str, Value)]) -> Value {
        let mut m: BTreeMap<String, Value> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let all = Value::from(m.clone());
        m.insert(OBJECTS_VAR.into(), all);
        Value::from(m)
    }

    fn db() -> Value {
        let map = serde_json::json!({"host": "db.local", "username": "app", "password": "p@ss:w/rd", "port": 5432});
        Value::from_object(MapValue::new(&map.to_string(), map.as_object().unwrap()))
    }

    fn render(source: &str, root: Value) -> Result<String, String> {
        let mut t = Templates::new();
        t.add("t", source)?;
        let out = t.render("t", root, 1 << 20)?;
        Ok(String::from_utf8(out.into_bytes().to_vec()).unwrap())
    }

    #[test]
    fn renders_keys_filters_and_loops() {
        let r = root(&[("db", db()), ("token", Value::from("tok"))]);
        assert_eq!(
            render(
                "{{ db.host }}:{{ db.port }}:*:{{ db.username }}:{{ db.password }}\n",
                r.clone()
            )
            .unwrap(),
            "db.local:5432:*:app:p@ss:w/rd\n"
        );
        assert_eq!(
            render(
                "postgres://{{ db.username }}:{{ db.password|urlencode }}@h",
                r.clone()
            )
            .unwrap(),
            "postgres://app:p%40ss%3Aw%2Frd@h"
        );
        assert_eq!(
            render(
                "{% for k, v in db|items %}{{ k }}={{ v }};{% endfor %}",
                r.clone()
            )
            .unwrap(),
            "host=db.local;password=p@ss:w/rd;port=5432;username=app;"
        );
        assert_eq!(render("{{ objects['token'] }}", r.clone()).unwrap(), "tok");
        assert_eq!(
            render("{{ db.password|pgpass }}", r.clone()).unwrap(),
            "p@ss\\:w/rd"
        );
        assert_eq!(
            render("{{ missing|default('x') }}", r.clone()).unwrap(),
            "x"
        );
        assert_eq!(
            render(
                "{% if db.sslmode is defined %}s{% else %}n{% endif %}",
                r.clone()
            )
            .unwrap(),
            "n"
        );
        assert!(render("{{ db }}", r.clone()).unwrap().contains("\"host\""));
    }

    #[test]
    fn missing_keys_name_the_expression() {
        let r = root(&[("db", db())]);
        let e = render("x {{ db.pasword }} y", r.clone()).unwrap_err();
        assert!(e.contains("db.pasword") && e.contains("undefined"), "{e}");
        assert!(!e.contains("p@ss"), "{e}");
        let e = render("{{ nope.key }}", r).unwrap_err();
        assert!(e.contains("nope.key"), "{e}");
    }

    #[test]
    fn growth_calls_and_access_are_refused_at_compile_time() {
        let mut t = Templates::new();
        for (src, what) in [
            ("{{ 'x' * 1000000 }}", "`*`"),
            ("{% do db.x() %}", "do"),
            ("{{ range(10) }}", "call"),
            ("{{ db.items() }}", "call"),
            ("{% include 'x' %}", "include"),
            ("{% macro f() %}{% endmacro %}", "macro"),
            ("{% import 'x' as y %}", "import"),
            ("{{ db|replace('a', db) }}", "computed argument"),
            ("{{ db|indent(4) }}", "filter"),
            ("{{ db is callable }}", "test"),
            ("{% for x in db recursive %}{% endfor %}", "recursive"),
        ] {
            let e = t.add("t", src).unwrap_err();
            assert!(e.contains(what), "{src}: {e}");
        }
        assert!(t.add("t", "{{ x").unwrap_err().contains("line 1"));
        assert!(t.add("t", &"x".repeat(MAX_TEMPLATE_BYTES + 1)).is_err());
    }

    #[test]
    fn bombs_stop_within_bounds() {
        let big = Value::from("ab".repeat(100_000));
        let r = root(&[("x", big)]);
        // Exponential growth through filters: the budget stops it.
        let chain = format!("{{{{ x{} }}}}", "|replace('a', 'aaaaaaaa')".repeat(12));
        let started = std::time::Instant::now();
        let e = render(&chain, r.clone()).unwrap_err();
        assert!(e.contains("bytes") || e.contains("fuel"), "{chain}: {e}");
        // Doubling through `set`: fuel charges every byte made.
        let doubling = format!(
            "{{% set a = x %}}{}{{{{ a|length }}}}",
            "{% set a = a ~ a %}".repeat(40)
        );
        let e = render(&doubling, r.clone()).unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        // A long loop: fuel stops it.
        let e = render(
            "{% for a in x %}{% for b in x %}{% if a == b %}{% endif %}{% endfor %}{% endfor %}",
            r.clone(),
        )
        .unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        // Output beyond the file limit.
        let e = render("{% for a in x %}{{ x }}{% endfor %}", r).unwrap_err();
        assert!(e.contains("output exceeds"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn reads_are_found() {
        let mut t = Templates::new();
        let r = t
            .add(
                "t",
                "{{ db.host }}{{ objects['a/b'].k }}{% for k in token %}{{ k }}{% endfor %}",
            )
            .unwrap();
        assert!(r.names.contains("db") && r.names.contains("token"));
        assert!(r.by_key.contains("a/b") && !r.any);
        assert!(t.add("t", "{{ objects[db.x] }}").unwrap().any);
    }
}
