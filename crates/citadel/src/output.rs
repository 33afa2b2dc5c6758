//! Rendering replies as tables (for people) or JSON (for scripts).

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "n/a".into(),
        other => other.to_string(),
    }
}

/// Prints an object as a two-column key/value table, in key order.
pub fn print_map(value: &Value, format: Format) {
    match format {
        Format::Json => out!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Format::Table => {
            let Some(map) = value.as_object() else {
                out!("{}", scalar(value));
                return;
            };
            let width = map.keys().map(String::len).max().unwrap_or(3).max(3);
            out!("{:width$}    {}", "Key", "Value");
            out!("{:width$}    {}", "---", "-----");
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for k in keys {
                out!("{k:width$}    {}", scalar(&map[k]));
            }
        }
    }
}

pub fn print_list(keys: &[String], format: Format) {
    match format {
        Format::Json => out!("{}", serde_json::to_string_pretty(keys).unwrap_or_default()),
        Format::Table => {
            out!("Keys\n----");
            for k in keys {
                out!("{k}");
            }
        }
    }
}

/// Prints rows (objects) with the given columns.
pub fn print_rows(rows: &[Value], columns: &[&str], format: Format) {
    if format == Format::Json {
        out!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| scalar(&r[*c])).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|row| row[i].len()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |items: Vec<String>| {
        items.iter().zip(&widths).map(|(s, w)| format!("{s:w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    out!("{}", line(columns.iter().map(|c| c.to_string()).collect()));
    out!("{}", line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in cells {
        out!("{}", line(row));
    }
}
