//! A strict reader of the Prometheus / OpenMetrics text format, for tests and tools that
//! check what a daemon exposes: every line must be a comment (`# HELP`, `# TYPE`, `# UNIT`,
//! `# EOF`) or a sample `name{label="value",…} number`; anything else is an error naming the
//! line. It reads what `prometheus-client` writes (no exemplars, no timestamps).

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: its samples and the declared type of each metric family.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {what}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub what: &'static str,
    pub text: String,
}

impl Scrape {
    /// The value of the sample named `name` whose labels include all of `labels`; `None` if
    /// there is none. With several matches, the first.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// The sum over all samples named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// Parses a whole exposition.
pub fn parse(body: &str) -> Result<Scrape, ParseError> {
    let mut out = Scrape::default();
    for (i, line) in body.lines().enumerate() {
        let err = |what| ParseError {
            line: i + 1,
            what,
            text: line.chars().take(200).collect(),
        };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("EOF") => {}
                Some("HELP") | Some("UNIT") => {
                    parts
                        .next()
                        .filter(|n| valid_name(n))
                        .ok_or(err("bad metric name"))?;
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .filter(|n| valid_name(n))
                        .ok_or(err("bad metric name"))?;
                    let ty = parts.next().ok_or(err("TYPE without a type"))?;
                    out.types.insert(name.to_string(), ty.to_string());
                }
                _ => return Err(err("unknown comment")),
            }
            continue;
        }
        out.samples.push(sample(line).ok_or(err("not a sample"))?);
    }
    Ok(out)
}

fn valid_name(n: &str) -> bool {
    let mut cs = n.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let key = &r[..eq];
            if !valid_name(key) || key.contains(':') {
                return None;
            }
            let (value, after) = quoted(r[eq + 1..].strip_prefix('"')?)?;
            labels.insert(key.to_string(), value);
            r = after.strip_prefix(',').unwrap_or(after);
        }
    }
    let mut fields = rest.strip_prefix(' ')?.split(' ');
    let value = number(fields.next()?)?;
    // An optional timestamp; nothing after it.
    if let Some(ts) = fields.next() {
        number(ts)?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A label value up to its closing quote, unescaped; and what follows the quote.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                _ => return None,
            },
            '\n' => return None,
            c => out.push(c),
        }
    }
    None
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;
    use proptest::prelude::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct L {
        image: String,
    }

    #[test]
    fn reads_what_prometheus_client_writes() {
        let mut reg = Registry::with_prefix("t");
        let f = Family::<L, Counter>::default();
        reg.register("bytes", "Bytes", f.clone());
        let h = Histogram::new([1.0, 10.0]);
        reg.register("secs", "Seconds", h.clone());
        f.get_or_create(&L {
            image: "deb:1 \"x\"\\".into(),
        })
        .inc_by(7);
        h.observe(3.0);
        h.observe(30.0);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        let p = parse(&s).unwrap();
        assert_eq!(
            p.value("t_bytes_total", &[("image", "deb:1 \"x\"\\")]),
            Some(7.0)
        );
        assert_eq!(p.value("t_secs_count", &[]), Some(2.0));
        assert_eq!(p.value("t_secs_bucket", &[("le", "10.0")]), Some(1.0));
        assert_eq!(p.value("t_secs_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(p.types.get("t_secs").map(String::as_str), Some("histogram"));
    }

    #[test]
    fn refuses_what_is_not_the_format() {
        for bad in [
            "x 1 2 3",
            "1x 2",
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x{a=\"1\"}",
            "x abc",
            "# NOPE x",
            "<html>",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("ok 1\nbad line").unwrap_err().line, 2);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn label_values_survive_escaping(v in "\\PC{0,40}", n in 0u64..1_000_000) {
            let mut reg = Registry::default();
            let f = Family::<L, Counter>::default();
            reg.register("c", "C", f.clone());
            f.get_or_create(&L { image: v.clone() }).inc_by(n);
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
            let p = parse(&s).unwrap();
            prop_assert_eq!(p.value("c_total", &[("image", v.as_str())]), Some(n as f64));
        }
    }
}
