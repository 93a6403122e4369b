//! Plain aligned tables for terminal output.

use std::io::Write;

/// Writes a header and rows, columns padded to their widest cell; the last
/// column is not padded.
pub fn write(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                text.push_str(&" ".repeat(pad));
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `N-hash` with the hash cut to 12 characters; anything else as it is.
pub fn short_generation(name: &str) -> String {
    match name.split_once('-') {
        Some((n, hash)) if n.parse::<u64>().is_ok() => {
            format!("{n}-{}", hash.chars().take(12).collect::<String>())
        }
        _ => name.to_owned(),
    }
}

/// The GENERATION cell: a machine's observed `current` (the truth), with
/// the generation last applied beside it when they differ; else the one
/// last applied; else `-`.
pub fn generation_cell(current: Option<&str>, applied: Option<&str>) -> String {
    let applied = applied.map(short_generation);
    match (current.map(short_generation), applied) {
        (Some(current), Some(applied)) if current != applied => {
            format!("{current} (applied {applied})")
        }
        (Some(current), _) => current,
        (None, Some(applied)) => applied,
        (None, None) => "-".to_owned(),
    }
}
