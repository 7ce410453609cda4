/* The script of the page `charlstm visualize` writes; charlstm/visualize/page.py inlines it.
   The page loads nothing and holds no two slashes in a row (the tests check): block comments only. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("charlstm-data").textContent);
  var $ = function (id) { return document.getElementById(id); };

  /* base64url -> bytes */
  function decode(s) {
    var bin = atob(s.split("-").join("+").split("_").join("\x2f"));
    var out = new Uint8Array(bin.length);
    for (var k = 0; k < bin.length; k++) { out[k] = bin.charCodeAt(k); }
    return out;
  }
  /* the text is embedded as UTF-8 bytes, so that nothing it says can act as markup or an address */
  var chars = Array.from(new TextDecoder("utf-8").decode(decode(D.text_b64)));
  var T = chars.length;
  var H = D.hidden;

  /* every trace: one byte per value, unit-major */
  var traces = D.layers.map(function (layer) {
    var m = {};
    Object.keys(layer).forEach(function (q) { m[q] = { lo: layer[q].lo, hi: layer[q].hi, bytes: decode(layer[q].b64) }; });
    return m;
  });
  function values(layer, q, unit) {
    var t = traces[layer][q], lo = t.lo[unit], span = t.hi[unit] - t.lo[unit];
    var out = new Float32Array(T);
    for (var k = 0; k < T; k++) { out[k] = lo + span * t.bytes[unit * T + k] / 255; }
    return out;
  }
  function toColourScale(v, q, scale) {
    var s = new Float32Array(v.length), m = 0, k;
    if (D.gates.indexOf(q) < 0) {          /* states (h, c, the mogrifier's x_mod, h_mod): unbounded */
      if (scale === "fixed") {
        for (k = 0; k < v.length; k++) { s[k] = q === "c" ? Math.tanh(v[k]) : Math.max(-1, Math.min(1, v[k])); }
      } else {
        for (k = 0; k < v.length; k++) { m = Math.max(m, Math.abs(v[k])); }
        for (k = 0; k < v.length; k++) { s[k] = m > 0 ? v[k] / m : 0; }
      }
    } else {
      for (k = 0; k < v.length; k++) { s[k] = Math.max(-1, Math.min(1, 2 * v[k] - 1)); }
    }
    return { s: s, max: m };
  }
  function rgb(s) {
    s = Math.max(-1, Math.min(1, s));
    if (s >= 0) { return "rgb(255," + Math.round(255 - 190 * s) + "," + Math.round(255 - 200 * s) + ")"; }
    var a = -s;
    return "rgb(" + Math.round(255 - 200 * a) + "," + Math.round(255 - 130 * a) + ",255)";
  }
  function show(ch) {
    if (ch === " ") { return "' '"; }
    return JSON.stringify(ch);
  }

  /* header */
  var m = D.meta, parts = [];
  parts.push(D.variant + (m.backend ? " (" + m.backend + ")" : ""));
  parts.push(D.layers.length + " layer" + (D.layers.length > 1 ? "s" : "") + " x " + H + " units");
  parts.push(T + " characters");
  if (m.bpc !== null && m.bpc !== undefined) { parts.push(m.bpc.toFixed(3) + " bits/char on this text"); }
  if (m.checkpoint) { parts.push("checkpoint " + m.checkpoint); }
  $("meta").textContent = parts.join(" \u00b7 ");
  $("notes").textContent = D.notes.join("; ");

  /* text */
  var pre = $("text"), spans = new Array(T);
  var frag = document.createDocumentFragment();
  for (var t = 0; t < T; t++) {
    var sp = document.createElement("span");
    sp.textContent = chars[t] === "\n" ? " \n" : chars[t];
    sp.setAttribute("data-t", String(t));
    spans[t] = sp;
    frag.appendChild(sp);
  }
  pre.appendChild(frag);

  /* controls */
  D.layers.forEach(function (_, k) {
    var o = document.createElement("option"); o.value = String(k); o.textContent = String(k); $("layer").appendChild(o);
  });
  D.quantities.forEach(function (q) {
    var o = document.createElement("option"); o.value = q; o.textContent = q + ": " + D.quantity_help[q]; $("quantity").appendChild(o);
  });
  $("unit").max = String(H - 1);

  var current = null;
  function select(layer, unit, q, scale) {
    layer = Math.max(0, Math.min(D.layers.length - 1, layer | 0));
    if (D.quantities.indexOf(q) < 0) { q = D.quantities[0]; }
    unit = Math.max(0, Math.min(traces[layer][q].lo.length - 1, unit | 0));   /* x_mod of layer 0 is E wide */
    if (scale !== "fixed") { scale = "unit"; }
    $("layer").value = String(layer); $("unit").value = String(unit); $("quantity").value = q; $("scale").value = scale;
    var v = values(layer, q, unit);
    var c = toColourScale(v, q, scale);
    for (var k = 0; k < T; k++) { spans[k].style.backgroundColor = rgb(c.s[k]); }
    current = { layer: layer, unit: unit, q: q, v: v };
    var gate = D.gates.indexOf(q) >= 0;
    $("lo").textContent = gate ? "0" : (scale === "fixed" ? (q === "c" ? "tanh -1" : "-1") : (-c.max).toPrecision(3));
    $("hi").textContent = gate ? "1" : (scale === "fixed" ? (q === "c" ? "tanh +1" : "+1") : (c.max).toPrecision(3));
    $("what").textContent = "layer " + layer + ", unit " + unit + ", " + D.quantity_help[q];
    var hash = "#layer=" + layer + "&unit=" + unit + "&q=" + q + "&scale=" + scale;
    if (window.location.hash !== hash && window.history && window.history.replaceState) {
      try { window.history.replaceState(null, "", hash); } catch (e) { /* some browsers refuse on file: pages */ }
    }
  }
  function fromControls() { select(+$("layer").value, +$("unit").value, $("quantity").value, $("scale").value); }
  ["layer", "unit", "quantity", "scale"].forEach(function (id) { $(id).addEventListener("change", fromControls); });
  $("unit").addEventListener("input", fromControls);
  $("prev").addEventListener("click", function () { $("unit").value = String(+$("unit").value - 1); fromControls(); });
  $("next").addEventListener("click", function () { $("unit").value = String(+$("unit").value + 1); fromControls(); });

  /* the best unit of each feature, above the text; every ranked unit in the table below */
  function unitButton(u, bold) {
    var btn = document.createElement("button"); btn.type = "button";
    btn.textContent = u.layer + ":" + u.unit + " " + u.quantity + " r=" + (u.r >= 0 ? "+" : "") + u.r.toFixed(2);
    if (bold) { btn.style.fontWeight = "bold"; }
    btn.addEventListener("click", function () { select(u.layer, u.unit, u.quantity, $("scale").value); });
    return btn;
  }
  var best = $("best");
  if (D.features.length) { best.appendChild(document.createTextNode("best unit per feature: ")); }
  D.features.forEach(function (f) {
    var label = document.createElement("span");
    label.textContent = " " + f.feature + " ";
    label.title = f.help;
    best.appendChild(label);
    if (f.units.length) { best.appendChild(unitButton(f.units[0], false)); }
    else { best.appendChild(document.createTextNode("(constant) ")); }
  });
  var table = $("features");
  var head = document.createElement("tr");
  ["feature", "meaning", "best units"].forEach(function (s) { var th = document.createElement("th"); th.textContent = s; head.appendChild(th); });
  table.appendChild(head);
  D.features.forEach(function (f) {
    var tr = document.createElement("tr");
    var a = document.createElement("td"); a.textContent = f.feature; tr.appendChild(a);
    var b = document.createElement("td"); b.className = "help"; b.textContent = f.help; tr.appendChild(b);
    var c = document.createElement("td");
    if (f.constant) { c.textContent = "constant in this text"; }
    f.units.forEach(function (u, k) { c.appendChild(unitButton(u, k === 0)); });
    tr.appendChild(c);
    table.appendChild(tr);
  });

  /* hover: the unit's value and the model's next-character predictions */
  var tip = $("tip");
  function line(text, cls) { var d = document.createElement("div"); d.textContent = text; if (cls) { d.className = cls; } return d; }
  pre.addEventListener("mouseover", function (e) {
    var at = e.target.getAttribute && e.target.getAttribute("data-t");
    if (at === null || at === undefined || current === null) { return; }
    var t = +at;
    tip.textContent = "";
    tip.appendChild(line("#" + t + "  " + show(chars[t]) + "   " + current.q + " = " + current.v[t].toFixed(3)));
    if (t + 1 < T) {
      tip.appendChild(line("next " + show(chars[t + 1]) + "  p = " + D.p_next[t].toFixed(3), "actual"));
    }
    tip.appendChild(line("top " + D.top_ids[t].length + " predictions:"));
    D.top_ids[t].forEach(function (id, k) {
      var p = D.top_probs[t][k];
      var row = line(show(D.vocab[id]) + "  " + p.toFixed(3));
      if (t + 1 < T && D.vocab[id] === chars[t + 1]) { row.className = "actual"; }
      var bar = document.createElement("span"); bar.className = "bar"; bar.style.width = Math.round(80 * p) + "px";
      row.appendChild(bar);
      tip.appendChild(row);
    });
    tip.style.display = "block";
    e.target.classList.add("sel");
  });
  pre.addEventListener("mousemove", function (e) {
    var x = e.clientX + 14, y = e.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = e.clientX - tip.offsetWidth - 8; }
    if (y + tip.offsetHeight > window.innerHeight) { y = e.clientY - tip.offsetHeight - 8; }
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });
  pre.addEventListener("mouseout", function (e) {
    tip.style.display = "none";
    if (e.target.classList) { e.target.classList.remove("sel"); }
  });

  /* initial selection: the address (#layer=..&unit=..&q=..&scale=..), else the best-correlated unit */
  var init = D.initial, scale = "unit";
  window.location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    var p = kv.split("=");
    if (p[0] === "layer") { init = Object.assign({}, init, { layer: +p[1] }); }
    if (p[0] === "unit") { init = Object.assign({}, init, { unit: +p[1] }); }
    if (p[0] === "q") { init = Object.assign({}, init, { quantity: p[1] }); }
    if (p[0] === "scale") { scale = p[1]; }
  });
  select(init.layer, init.unit, init.quantity, scale);
})();
