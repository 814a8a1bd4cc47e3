//! Plain-text output of the admin commands: tables with aligned columns and `name  value`
//! detail blocks. Columns are separated by two spaces and padded to the widest cell (counted
//! in characters); lines carry no trailing spaces, so the output diffs and greps cleanly.

/// A table: a header row and data rows of the same width.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells are blank, extra ones dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, one line per row after the header, each ending in `\n`.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            push_aligned(&mut out, row, &widths);
        }
        out
    }
}

/// `name  value` lines with the values aligned; a value with several lines continues under
/// the first.
pub fn details(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (name, value) in fields {
        let mut lines = value.lines();
        let first = lines.next().unwrap_or("");
        push_aligned(
            &mut out,
            &[name.to_string(), first.to_string()],
            &[width, 0],
        );
        for more in lines {
            push_aligned(&mut out, &[String::new(), more.to_string()], &[width, 0]);
        }
    }
    out
}

fn push_aligned(out: &mut String, cells: &[String], widths: &[usize]) {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        line.push_str(cell);
        let pad = width.saturating_sub(cell.chars().count());
        line.extend(std::iter::repeat_n(' ', pad));
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["ID", "NAME", "RATE"]);
        t.row(vec!["n371pt".into(), "Silver".into(), "50".into()]);
        t.row(vec!["a1".into(), "Gold tier".into()]);
        assert_eq!(
            t.render(),
            "ID      NAME       RATE\n\
             n371pt  Silver     50\n\
             a1      Gold tier\n"
        );
    }

    #[test]
    fn details_align_values_and_continue_multi_line_ones() {
        let out = details(&[("id", "n371pt".into()), ("stages", "a:prod\nb:dev".into())]);
        assert_eq!(out, "id      n371pt\nstages  a:prod\n        b:dev\n");
    }
}
