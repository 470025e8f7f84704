// The sidero dashboard's live updates: follow the page's server-sent event stream and patch
// the server-rendered HTML (rows come rendered and escaped by the server; log lines are text).
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  const MAX_LOG_LINES = 5000;
  const MAX_STEPS = 200;

  function fragment(html) {
    const t = document.createElement("template");
    t.innerHTML = html;
    return t.content.firstElementChild;
  }

  function setSections(sections) {
    for (const [id, html] of Object.entries(sections)) {
      const el = document.getElementById(id);
      if (el) el.innerHTML = html;
    }
  }

  function setRow(d) {
    const body = document.getElementById(d.section);
    if (!body) return;
    const old = document.getElementById(d.id);
    if (d.html === null) { if (old) old.remove(); return; }
    const row = fragment(d.html);
    row.classList.add("fresh");
    if (old) { old.replaceWith(row); return; }
    for (const other of body.children) {
      if ((other.dataset.key || "") > d.key) { body.insertBefore(row, other); return; }
    }
    body.appendChild(row);
  }

  function addStep(d) {
    const body = document.getElementById("timeline");
    if (!body) return;
    const row = fragment(d.html);
    row.classList.add("fresh");
    body.insertBefore(row, body.firstChild);
    while (body.children.length > MAX_STEPS) body.lastElementChild.remove();
  }

  function addLines(lines, replace) {
    const pre = document.getElementById("logs");
    if (!pre) return;
    const follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (replace) pre.textContent = "";
    pre.appendChild(document.createTextNode(lines.map((l) => l + "\n").join("")));
    if (pre.textContent.length > 0) {
      const all = pre.textContent.split("\n");
      if (all.length > MAX_LOG_LINES + 1) pre.textContent = all.slice(-MAX_LOG_LINES - 1).join("\n");
    }
    if (follow) pre.scrollTop = pre.scrollHeight;
  }

  const stream = new EventSource(live.dataset.stream);
  stream.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  stream.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live off"; });
  stream.addEventListener("snapshot", (e) => {
    const d = JSON.parse(e.data);
    setSections(d.sections);
    if (d.lines) addLines(d.lines, true);
  });
  stream.addEventListener("row", (e) => setRow(JSON.parse(e.data)));
  stream.addEventListener("html", (e) => {
    const d = JSON.parse(e.data);
    setSections({ [d.id]: d.html });
  });
  stream.addEventListener("step", (e) => addStep(JSON.parse(e.data)));
  stream.addEventListener("log", (e) => addLines(JSON.parse(e.data).lines, false));
})();
