// A small Markdown renderer for the chat (homering's own; no library): fenced code, inline code, headings,
// bold, italic, links (http and https only), lists, block quotes and paragraphs. Everything is HTML-escaped
// first, so the model's text can never inject markup.
"use strict";

(function () {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function inline(s) {
    const codes = [];
    s = s.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
  }

  function flushList(out, list) {
    if (list.items.length) {
      out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + "</" + list.tag + ">");
    }
    list.items = [];
  }

  function render(text) {
    const lines = escapeHtml(text).split("\n");
    const out = [];
    const list = { tag: "ul", items: [] };
    let para = [];
    const flushPara = () => { if (para.length) out.push("<p>" + inline(para.join("<br>")) + "</p>"); para = []; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara(); flushList(out, list);
        const code = [];
        for (i++; i < lines.length && !/^```\s*$/.test(lines[i]); i++) code.push(lines[i]);
        out.push('<pre><code class="lang-' + (fence[1] || "text") + '">' + code.join("\n") + "</code></pre>");
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const quote = line.match(/^&gt;\s?(.*)$/);
      if (heading) { flushPara(); flushList(out, list); out.push("<h" + heading[1].length + ">" + inline(heading[2]) + "</h" + heading[1].length + ">"); }
      else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (list.tag !== tag) { flushList(out, list); list.tag = tag; }
        list.items.push((bullet || numbered)[1]);
      }
      else if (quote) { flushPara(); flushList(out, list); out.push("<blockquote>" + inline(quote[1]) + "</blockquote>"); }
      else if (!line.trim()) { flushPara(); flushList(out, list); }
      else { flushList(out, list); para.push(line); }
    }
    flushPara(); flushList(out, list);
    return out.join("\n");
  }

  window.renderMarkdown = render;
})();
