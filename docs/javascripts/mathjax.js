window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// MathJax typesets the page it loads on by itself. Later pages (if the theme's instant
// navigation is turned on) are typeset afresh here. Doing this on the first page too, after
// MathJax's own pass, would clear the output's cache of glyph styles with nothing left to
// typeset: every formula would stay on the page, blank.
{
  let firstPage = true
  document$.subscribe(() => {
    if (firstPage) {
      firstPage = false
      return
    }
    MathJax.startup.output.clearCache()
    MathJax.typesetClear()
    MathJax.texReset()
    MathJax.typesetPromise()
  })
}
