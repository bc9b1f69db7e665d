// Long code lines wrap (extra.css); a wrapped line hangs 4 columns under its own indentation,
// as editors wrap code. The highlighter puts each line in a span (line_spans in mkdocs.yml);
// this gives each span its indentation. Copying is unaffected: the text is unchanged.
document$.subscribe(() => {
  for (const line of document.querySelectorAll("pre > code > span[id^='__span-']")) {
    const indent = /^ */.exec(line.textContent)[0].length
    if (indent) line.style.setProperty("--indent", indent)
  }
})
