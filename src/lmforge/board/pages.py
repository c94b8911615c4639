"""The board's pages: plain HTML and a little JavaScript (no framework, nothing fetched from outside:
the board works offline). Each page polls the board's JSON API and redraws; curves are drawn on a
<canvas> by `plot()` below."""

from __future__ import annotations

import html

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{background:#22303c;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header a{color:#cde;text-decoration:none} header b{font-size:17px}
main{padding:16px 20px;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} .running{color:#0a6} .evaluating{color:#0a6} .preparing{color:#0a6} .pending{color:#888} .finished{color:#246} .failed{color:#b00} .interrupted{color:#b60}
.bar{background:#eee;width:120px;height:8px;display:inline-block;vertical-align:middle}
.bar i{background:#2a7;height:8px;display:block}
canvas{border:1px solid #e4e4e4;margin:4px 8px 8px 0} pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:320px}
.grid{display:flex;flex-wrap:wrap} .msg{white-space:pre-wrap;margin:4px 0} .you{color:#246} .model{color:#063}
"""

PLOT_JS = """
var COLOURS = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#17becf'];
function plot(canvas, title, series) {
  var ctx = canvas.getContext('2d'), W = canvas.width, H = canvas.height, L = 52, R = 10, T = 22, B = 26;
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, H);
  var xs = [], ys = [];
  series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
  ctx.fillStyle = '#222'; ctx.font = '12px sans-serif'; ctx.fillText(title, L, 14);
  if (!xs.length) { ctx.fillStyle = '#999'; ctx.fillText('no data yet', L, H / 2); return; }
  var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
  if (x1 === x0) {  // one step measured: its values, not a line on an axis that means nothing
    ctx.fillStyle = '#222'; ctx.font = '13px sans-serif';
    series.forEach(function (s, i) { var p = s.points[s.points.length - 1];
      if (p) { ctx.fillText(s.name + ' ' + p[1].toPrecision(4) + ' at step ' + p[0], L, T + 30 + 18 * i); } });
    canvas.setAttribute('data-points', xs.length); canvas.setAttribute('data-single-step', x0); return;
  }
  if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.1; y0 = y0 - Math.abs(y0 || 1) * 0.1; }
  function X(v) { return L + (v - x0) / (x1 - x0) * (W - L - R); }
  function Y(v) { return H - B - (v - y0) / (y1 - y0) * (H - T - B); }
  ctx.strokeStyle = '#ccc'; ctx.lineWidth = 1; ctx.strokeRect(L, T, W - L - R, H - T - B);
  ctx.fillStyle = '#555'; ctx.font = '10px sans-serif';
  [y0, (y0 + y1) / 2, y1].forEach(function (v) { ctx.fillText(v.toPrecision(3), 2, Y(v) + 3); });
  [x0, x1].forEach(function (v) { ctx.fillText(String(Math.round(v)), X(v) - 8, H - 10); });
  series.forEach(function (s, i) {
    ctx.strokeStyle = COLOURS[i % COLOURS.length]; ctx.fillStyle = ctx.strokeStyle; ctx.lineWidth = 1.6; ctx.beginPath();
    s.points.forEach(function (p, j) { if (j) { ctx.lineTo(X(p[0]), Y(p[1])); } else { ctx.moveTo(X(p[0]), Y(p[1])); } });
    ctx.stroke();
    if (s.points.length < 15) { s.points.forEach(function (p) { ctx.fillRect(X(p[0]) - 2, Y(p[1]) - 2, 4, 4); }); }
    if (series.length > 1) { ctx.fillText(s.name, W - R - 150, T + 12 + 12 * i); }
  });
  canvas.setAttribute('data-points', xs.length);
}
function esc(s) { var d = document.createElement('div'); d.textContent = s == null ? '' : String(s); return d.innerHTML; }
function fmt(v, d) { return v == null ? '–' : (typeof v === 'number' ? (Math.abs(v) >= 1000 ? Math.round(v).toLocaleString() : v.toPrecision(d || 4)) : esc(v)); }
function eta(s) { if (s == null) return '–'; s = Math.round(s); return s >= 3600 ? Math.floor(s / 3600) + 'h' + Math.floor(s % 3600 / 60) + 'm' : s >= 60 ? Math.floor(s / 60) + 'm' + (s % 60) + 's' : s + 's'; }
function get(url) { return fetch(url).then(function (r) { return r.json(); }); }
"""


def page(title: str, body: str, script: str = "") -> str:
    return f"""<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)} · lmforge board</title>
<style>{STYLE}</style><script>{PLOT_JS}</script></head><body>
<header><b>lmforge board</b><a href="/">runs</a><a href="/chat">chat</a><a href="/launch">launch</a></header>
<main>{body}</main><script>{script}</script></body></html>"""


RUNS = page("runs", """<h1>Runs</h1><p id=root></p>
<form id=compare action="/compare" method=get>
<table id=runs><thead><tr><th></th><th>run</th><th>status</th><th>recipe</th><th>stage</th><th>objective</th><th>method</th>
<th>progress</th><th>ETA</th><th>last loss</th><th>best val loss (step)</th><th>task metric</th></tr></thead><tbody></tbody></table>
<button type=submit>compare selected</button></form>""", """
var checked = {};
function draw() {
  get('/api/runs').then(function (data) {
    document.getElementById('root').textContent = data.root + ': ' + data.runs.length + ' run(s)';
    var rows = data.runs.map(function (r) {
      var p = r.progress == null ? '–' : '<span class=bar><i style="width:' + Math.round(100 * r.progress) + '%"></i></span> ' +
        r.step + '/' + r.total_steps;
      var task = r.accuracy != null ? 'accuracy ' + fmt(r.accuracy, 3) : (r.macro_f1 != null ? 'macro-F1 ' + fmt(r.macro_f1, 3) : '–');
      return '<tr data-run="' + esc(r.id) + '"><td>' + (r.waiting ? '' : '<input type=checkbox name=run value="' + esc(r.id) + '"' +
        (checked[r.id] ? ' checked' : '') + '>') + '</td><td>' + (r.waiting ? esc(r.id) : '<a href="/run/' + encodeURI(r.id) + '">' + esc(r.id) + '</a>') +
        '</td><td class="' + r.status + '">' + r.status +
        (r.message ? ' <small>' + esc(r.message) + '</small>' : '') + '</td><td>' + esc(r.recipe) + '</td><td>' + esc(r.stage || '–') +
        '</td><td>' + esc(r.objective) + '</td><td>' + esc(r.method) + '</td><td>' + p + '</td><td>' + eta(r.eta_seconds) +
        '</td><td>' + fmt(r.last_loss) + '</td><td class=best>' + (r.best_val_loss == null ? '–' : fmt(r.best_val_loss) + ' (' + r.best_step + ')') +
        '</td><td>' + task + '</td></tr>';
    });
    document.querySelector('#runs tbody').innerHTML = rows.join('');
    document.querySelectorAll('#runs input').forEach(function (box) {
      box.onchange = function () { checked[box.value] = box.checked; };
    });
    document.body.setAttribute('data-loaded', data.runs.length);
  });
}
draw(); setInterval(draw, 2000);
""")


def run_page(ident: str) -> str:
    quoted = html.escape(ident)
    return page(ident, f"""<h1>Run {quoted}</h1><p id=state></p>
<div class=grid><canvas id=loss width=520 height=260></canvas><canvas id=val width=520 height=260></canvas>
<canvas id=lr width=520 height=200></canvas><canvas id=grad_norm width=520 height=200></canvas>
<canvas id=tokens_per_s width=520 height=200></canvas></div>
<h2>Log</h2><pre id=log></pre>
<h2>Sample generations</h2><table id=samples></table>
<h2>Pre-launch check</h2><pre id=check>(none recorded)</pre>
<h2>Recipe</h2><pre id=recipe></pre>""", """
var ID = decodeURI(location.pathname.slice(5));
function draw() {
  get('/api/runs/' + encodeURI(ID)).then(function (r) {
    document.getElementById('state').innerHTML = '<b class="' + r.status + '">' + r.status + '</b> · step ' + r.step +
      (r.total_steps ? ' of ' + r.total_steps : '') + ' · ETA ' + eta(r.eta_seconds) + (r.message ? ' · ' + esc(r.message) : '') +
      (r.model ? ' · model <code>' + esc(r.model) + '</code> (<a href="/chat?run=' + encodeURIComponent(r.id) + '">chat</a>)' : '');
    var train = r.series.train || {}, val = r.series.val || {};
    plot(document.getElementById('loss'), 'training loss', [{name: 'train', points: train.loss || []}]);
    plot(document.getElementById('val'), 'validation', Object.keys(val).filter(function (k) { return /loss|accuracy|f1/.test(k); })
      .map(function (k) { return {name: k, points: val[k]}; }));
    ['lr', 'grad_norm', 'tokens_per_s'].forEach(function (k) { plot(document.getElementById(k), k, [{name: k, points: train[k] || []}]); });
    var log = document.getElementById('log'), following = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.textContent = r.log.join('\\n');
    if (following) { log.scrollTop = log.scrollHeight; }  // the newest line in view, unless the reader scrolled up
    document.getElementById('recipe').textContent = r.recipe_text;
    if (r.check) { document.getElementById('check').textContent = r.check; }
    document.getElementById('samples').innerHTML = '<tr><th>prompt</th><th>generation</th></tr>' + Object.keys(r.samples).map(function (p) {
      return '<tr><td>' + esc(p) + '</td><td>' + esc(r.samples[p]) + '</td></tr>'; }).join('');
    document.body.setAttribute('data-loaded', '1');
    if (r.status === 'running' || r.status === 'evaluating') { setTimeout(draw, 2000); }
  });
}
draw();
""")


CHAT = page("chat", """<h1>Chat</h1>
<p>Model: <select id=model></select> <small>(the final model of a finished run, through lmforge serve's code)</small></p>
<div id=conversation></div>
<form id=ask><input id=text size=80 placeholder="type a message"> <button>send</button></form>""", """
var messages = [];
get('/api/models').then(function (data) {
  var want = new URLSearchParams(location.search).get('run');
  document.getElementById('model').innerHTML = data.models.map(function (m) {
    return '<option value="' + esc(m.id) + '"' + (m.id === want ? ' selected' : '') + '>' + esc(m.id) + '</option>'; }).join('');
  document.body.setAttribute('data-models', data.models.length);
});
function show(role, text) {
  var div = document.createElement('div'); div.className = 'msg ' + (role === 'user' ? 'you' : 'model');
  div.textContent = (role === 'user' ? 'you: ' : 'model: ') + text; document.getElementById('conversation').appendChild(div);
}
document.getElementById('ask').onsubmit = function (e) {
  e.preventDefault(); var text = document.getElementById('text').value; if (!text) return;
  messages.push({role: 'user', content: text}); show('user', text); document.getElementById('text').value = '';
  fetch('/api/chat', {method: 'POST', headers: {'content-type': 'application/json'},
    body: JSON.stringify({run: document.getElementById('model').value, messages: messages, max_tokens: 48})})
    .then(function (r) { return r.json(); }).then(function (r) {
      if (r.error) { messages.pop(); show('model', '[' + r.error.message + '] (this turn is not kept)'); return; }
      messages.push({role: 'assistant', content: r.reply}); show('assistant', r.reply);
      document.body.setAttribute('data-replies', messages.length / 2);
    });
};
""")


def launch_page(recipes: list[str], allowed: bool) -> str:
    options = "".join(f"<option>{html.escape(r)}</option>" for r in recipes)
    note = ("" if allowed else "<p><b>Launching is off</b>: start the board with <code>--allow-launch</code> to run "
            "recipes from here; the preview shows the command to run yourself.</p>")
    return page("launch", f"""<h1>Launch a recipe</h1>{note}
<p>Recipe: <select id=recipe>{options}</select></p>
<p>Overrides (KEY=VALUE, space-separated): <input id=overrides size=70 placeholder="trainer.max_steps=100 output_dir=runs/try"></p>
<p>Command: <code id=command></code></p><button id=go{'' if allowed else ' disabled'}>launch</button><pre id=result></pre>""", """
function preview() {
  var body = JSON.stringify({recipe: document.getElementById('recipe').value, overrides: document.getElementById('overrides').value});
  fetch('/api/launch/preview', {method: 'POST', headers: {'content-type': 'application/json'}, body: body})
    .then(function (r) { return r.json(); }).then(function (r) {
      document.getElementById('command').textContent = r.command ? 'cd ' + r.cwd + ' && ' + r.command : r.error.message; });
}
document.getElementById('recipe').onchange = preview; document.getElementById('overrides').oninput = preview; preview();
document.getElementById('go').onclick = function () {
  var body = JSON.stringify({recipe: document.getElementById('recipe').value, overrides: document.getElementById('overrides').value});
  fetch('/api/launch', {method: 'POST', headers: {'content-type': 'application/json'}, body: body})
    .then(function (r) { return r.json(); }).then(function (r) {
      document.getElementById('result').textContent = r.error ? r.error.message : 'started, pid ' + r.pid + '; output in ' + r.log; });
};
""")
