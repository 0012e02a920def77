// headmap report: builds the page from the JSON block #headmap-data with plotly.js.
// Data only ever reaches the document as text: textContent for DOM nodes, and entity-escaped
// strings for plotly labels (plotly reads a few HTML tags inside labels; entities keep text literal).
(function () {
  "use strict";

  var D = JSON.parse(document.getElementById("headmap-data").textContent);
  var L = D.layers;
  var H = D.heads;
  var FONT = { family: "system-ui, -apple-system, Segoe UI, Roboto, DejaVu Sans, sans-serif", size: 11 };
  var CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  var CATEGORY_COLOURS = ["#6b46c1", "#c53030", "#dd6b20", "#2f855a", "#2b6cb0", "#319795", "#d69e2e", "#a0aec0"];
  var pending = [];
  // attention maps: white at 0, dark red at the clip value
  var MAP_COLOURS = [[0, "#ffffff"], [0.1, "#fde8d7"], [0.35, "#f6a582"], [0.65, "#d6604d"], [1, "#67001f"]];

  function byId(id) { return document.getElementById(id); }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // plotly label text: entities for the three characters its label parser reads as markup
  function ptext(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "\u2013";
    if (typeof v !== "number") return String(v);
    var d = digits || 4;
    var s = Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(d - 1) : String(Number(v.toPrecision(d)));
    return s;
  }

  function range(n) { var out = []; for (var i = 0; i < n; i++) out.push(i); return out; }

  function grid(flat) {
    var z = [];
    for (var l = 0; l < L; l++) z.push(flat.slice(l * H, (l + 1) * H));
    return z;
  }

  function plot(div, traces, layout) {
    layout.font = FONT;
    layout.paper_bgcolor = "rgba(0,0,0,0)";
    pending.push(Plotly.newPlot(div, traces, layout, CONFIG));
    return div;
  }

  function heatmapLayout(height) {
    return {
      height: height,
      margin: { l: 44, r: 8, t: 6, b: 36 },
      xaxis: { title: { text: "head", standoff: 4 }, tickmode: "linear", tick0: 0, dtick: step(H, 12), zeroline: false },
      yaxis: { title: { text: "layer", standoff: 4 }, autorange: "reversed", tickmode: "linear", tick0: 0, dtick: step(L, 20),
               zeroline: false },
    };
  }

  // tick spacing: every index up to `every` cells, then 2, 4, 8, ...
  function step(n, every) { var d = 1; while (n / d > every) d *= 2; return d; }

  function headHeight() { return Math.max(220, Math.min(560, 13 * L + 70)); }

  function onClickOpen(div) {
    div.on("plotly_click", function (ev) {
      if (!ev || !ev.points || !ev.points.length) return;
      var p = ev.points[0];
      openPanel(Math.round(Number(p.y)), Math.round(Number(p.x)));
    });
  }

  // -- model card ---------------------------------------------------------------------------
  function renderCard() {
    byId("title").textContent = D.title;
    var table = byId("card");
    D.card.forEach(function (row) {
      var tr = el("tr");
      tr.appendChild(el("td", "", row[0]));
      tr.appendChild(el("td", "", row[1]));
      table.appendChild(tr);
    });
  }

  // -- categories ---------------------------------------------------------------------------
  function renderCategories() {
    var cat = D.categories;
    var k = cat.names.length;
    var scale = [];
    cat.names.forEach(function (_, i) {
      var c = CATEGORY_COLOURS[i % CATEGORY_COLOURS.length];
      scale.push([i / k, c]);
      scale.push([(i + 1) / k, c]);
    });
    var z = grid(cat.main);
    var text = z.map(function (row, l) {
      return row.map(function (v, h) {
        var tags = cat.tags[l + "," + h] || [];
        return ptext(cat.names[v] + (tags.length > 1 ? " (also " + tags.slice(1).join(", ") + ")" : ""));
      });
    });
    var div = byId("categories-plot");
    if (!L || !H) { div.appendChild(el("p", "empty", "no head-level measurement in this run")); return; }
    var layout = heatmapLayout(headHeight());
    layout.margin.r = 110;
    plot(div, [{
      type: "heatmap", z: z, x: range(H), y: range(L), text: text, zmin: -0.5, zmax: k - 0.5,
      colorscale: scale, xgap: 1, ygap: 1,
      colorbar: { tickvals: range(k), ticktext: cat.names.map(ptext), thickness: 12, len: 1 },
      hovertemplate: "layer %{y}, head %{x}<br>%{text}<extra></extra>",
    }], layout);
    onClickOpen(div);
    var list = byId("category-rules");
    cat.rules.forEach(function (r) {
      var line = r.name + ": " + r.metric + " " + (r.test === ">=" ? "\u2265" : "\u2264") + " " + r.threshold + " \u2014 " + r.help;
      list.appendChild(el("li", "", line + (r.measured ? "" : " (not measured in this run)")));
    });
    list.appendChild(el("li", "", "mixed: none of the above"));
  }

  // -- heatmaps -----------------------------------------------------------------------------
  function renderHeatmaps() {
    var box = byId("heatmaps");
    if (!D.metrics.length) { box.appendChild(el("p", "empty", "no head-level measurement in this run")); return; }
    D.metrics.forEach(function (m, i) {
      var card = el("div", "card");
      var label = m.probe === m.metric ? m.metric : m.probe + " / " + m.metric;
      card.appendChild(el("h3", "", label));
      card.appendChild(el("p", "hint", m.help || "\u00a0"));
      var div = el("div", "plot heatmap");
      div.id = "heatmap-" + i;
      div.setAttribute("data-metric", m.id);
      card.appendChild(div);
      box.appendChild(card);
      var se = grid(m.stderr);
      var n = grid(m.n);
      var custom = se.map(function (row, l) { return row.map(function (v, h) { return [fmt(v, 2), n[l][h]]; }); });
      plot(div, [{
        type: "heatmap", z: grid(m.value), x: range(H), y: range(L), customdata: custom,
        colorscale: "Viridis", xgap: 1, ygap: 1, hoverongaps: false,
        colorbar: { thickness: 10, len: 1, tickfont: { size: 10 } },
        hovertemplate: "layer %{y}, head %{x}<br>" + ptext(m.metric) + " = %{z:.4g} \u00b1 %{customdata[0]}<br>n = %{customdata[1]}<extra></extra>",
      }], heatmapLayout(headHeight()));
      onClickOpen(div);
    });
  }

  // -- top heads ----------------------------------------------------------------------------
  function renderTop() {
    var box = byId("top-tables");
    if (!D.top.length) { box.appendChild(el("p", "empty", "no head-level measurement in this run")); return; }
    D.top.forEach(function (t) {
      var table = el("table", "top");
      table.appendChild(el("caption", "", t.probe === t.metric ? t.probe : t.probe + " (" + t.metric + ")"));
      var head = el("thead");
      var hr = el("tr");
      ["layer", "head", "kv", "value", "\u00b1", "n"].forEach(function (c) { hr.appendChild(el("th", "", c)); });
      head.appendChild(hr);
      table.appendChild(head);
      var body = el("tbody");
      t.rows.forEach(function (r) {
        var tr = el("tr");
        [r[0], r[1], r[2], fmt(r[3]), fmt(r[4], 2), r[5]].forEach(function (c) { tr.appendChild(el("td", "", c)); });
        tr.addEventListener("click", function () { openPanel(r[0], r[1]); });
        body.appendChild(tr);
      });
      table.appendChild(body);
      box.appendChild(table);
    });
  }

  // -- token strips -------------------------------------------------------------------------
  var STRIP_MEASURES = [
    { key: "fai", label: "FAI (future attention influence)", rgb: "43,108,176" },
    { key: "received", label: "received attention (mean over layers)", rgb: "47,133,90" },
    { key: "sink_layers", label: "sink layers (primary or secondary)", rgb: "197,48,48" },
  ];

  function quantile(values, q) {
    var v = values.filter(function (x) { return x !== null && isFinite(x); }).sort(function (a, b) { return a - b; });
    if (!v.length) return 0;
    return v[Math.min(v.length - 1, Math.floor(q * (v.length - 1)))];
  }

  function paintStrips(key) {
    var measure = STRIP_MEASURES.filter(function (m) { return m.key === key; })[0];
    D.strips.forEach(function (s, si) {
      var values = s[key];
      var top = quantile(values, 0.97) || 1;
      var spans = byId("strip-" + si).childNodes;
      for (var i = 0; i < spans.length; i++) {
        var v = values[i];
        var a = v === null || v === undefined ? 0 : Math.max(0, Math.min(1, v / top));
        spans[i].style.backgroundColor = "rgba(" + measure.rgb + "," + (0.85 * a).toFixed(3) + ")";
        spans[i].classList.toggle("anchor", key === "fai" && s.anchor[i] === 1);
      }
    });
  }

  function renderStrips() {
    var box = byId("strips");
    var select = byId("strip-metric");
    if (!D.strips.length) {
      select.disabled = true;
      box.appendChild(el("p", "empty", "no token-level measurement in this run (probes received, fai, sinks)"));
      return;
    }
    var available = STRIP_MEASURES.filter(function (m) {
      return D.strips.some(function (s) { return s[m.key].some(function (v) { return v !== null && v !== 0; }); });
    });
    if (!available.length) available = STRIP_MEASURES.slice(0, 1);
    available.forEach(function (m) {
      var opt = el("option", "", m.label);
      opt.value = m.key;
      select.appendChild(opt);
    });
    D.strips.forEach(function (s, si) {
      var wrap = el("div", "strip");
      var shown = s.text.length < s.total ? " (first " + s.text.length + " shown)" : "";
      wrap.appendChild(el("h3", "", "sample " + s.sample + " \u00b7 " + s.total + " tokens" + shown));
      var tokens = el("div", "tokens");
      tokens.id = "strip-" + si;
      s.text.forEach(function (t, i) {
        var span = el("span", "tok", t);
        span.title = "position " + i + "\nFAI " + fmt(s.fai[i]) + (s.anchor[i] ? " (anchor)" : "") +
          "\nreceived " + fmt(s.received[i]) + "\nsink layers " + s.sink_layers[i] + ", hidden-sink layers " + s.hidden_layers[i];
        tokens.appendChild(span);
      });
      wrap.appendChild(tokens);
      box.appendChild(wrap);
    });
    select.addEventListener("change", function () { paintStrips(select.value); });
    paintStrips(available[0].key);
  }

  // -- sinks --------------------------------------------------------------------------------
  function renderSinks() {
    var div = byId("sinks-plot");
    if (!D.sinks || !D.sinks.tokens.length) {
      div.classList.remove("plot");
      div.appendChild(el("p", "empty", "no attention sink found in this run, or the sinks probe did not run"));
      return;
    }
    var toks = D.sinks.tokens;
    var labels = toks.map(function (t) { return ptext("s" + t.sample + ":" + t.position + " " + JSON.stringify(t.text)); });
    var kinds = [
      { key: "primary_sink", name: "primary", symbol: "circle", colour: "#c53030" },
      { key: "secondary_sink", name: "secondary", symbol: "diamond", colour: "#dd6b20" },
      { key: "hidden_sink", name: "hidden (single heads)", symbol: "x-thin-open", colour: "#2b6cb0" },
    ];
    var traces = kinds.map(function (k) {
      var x = [], y = [], size = [], custom = [];
      toks.forEach(function (t, i) {
        var part = t[k.key];
        part.layers.forEach(function (layer, j) {
          x.push(layer);
          y.push(labels[i]);
          var r = part.received[j] || 0;
          size.push(5 + 11 * Math.sqrt(Math.max(0, Math.min(1, r))));
          custom.push([fmt(r), fmt(part.norm_ratio[j], 3)]);
        });
      });
      return {
        type: "scatter", mode: "markers", name: k.name, x: x, y: y, customdata: custom,
        marker: { symbol: k.symbol, size: size, color: k.colour, line: { width: 1, color: k.colour } },
        hovertemplate: "%{y}<br>layer %{x}: " + k.name + "<br>received %{customdata[0]}, norm / median %{customdata[1]}<extra></extra>",
      };
    });
    traces.push({
      type: "bar", orientation: "h", name: "lifetime (layers)", x: toks.map(function (t) { return t.lifetime || 0; }),
      y: labels, xaxis: "x2", marker: { color: "#718096" }, hovertemplate: "%{y}<br>lifetime %{x} layers<extra></extra>",
    });
    traces.push({
      type: "bar", orientation: "h", name: "max norm / median", x: toks.map(function (t) { return t.max_norm_ratio || 0; }),
      y: labels, xaxis: "x3", marker: { color: "#d69e2e" },
      customdata: toks.map(function (t) { return fmt(t.max_norm); }),
      hovertemplate: "%{y}<br>max norm / median %{x:.3g} (norm %{customdata})<extra></extra>",
    });
    plot(div, traces, {
      height: 110 + 20 * toks.length,
      margin: { l: 190, r: 10, t: 34, b: 44 },
      legend: { orientation: "h", x: 0, y: 1, yanchor: "bottom" },
      xaxis: { domain: [0, 0.62], title: { text: "layer" }, range: [-0.5, L - 0.5], zeroline: false, tickmode: "linear",
               tick0: 0, dtick: step(L, 16) },
      xaxis2: { domain: [0.67, 0.82], anchor: "y", title: { text: "lifetime" }, zeroline: false },
      xaxis3: { domain: [0.86, 1], anchor: "y", title: { text: "norm / median" }, zeroline: false },
      yaxis: { type: "category", categoryorder: "array", categoryarray: labels, autorange: "reversed", automargin: true },
      hovermode: "closest",
    });
  }

  // -- settings -----------------------------------------------------------------------------
  function renderSettings() {
    byId("settings").textContent = JSON.stringify(D.settings, null, 2);
    var notes = byId("notes");
    if (!D.notes.length) notes.appendChild(el("li", "", "everything measured is shown (no report limit was reached)"));
    D.notes.forEach(function (n) { notes.appendChild(el("li", "", n)); });
  }

  // -- head panel ---------------------------------------------------------------------------
  var mapBytes = null;

  function mapCells(s, layer, head) {
    if (mapBytes === null) {
      var raw = atob(D.maps.data);
      mapBytes = new Uint8Array(raw.length);
      for (var i = 0; i < raw.length; i++) mapBytes[i] = raw.charCodeAt(i);
    }
    var n = s.n;
    var si = D.maps.samples.indexOf(s);
    var scale = D.maps.scale[(si * L + layer) * H + head] || 0;
    var start = s.offset + (layer * H + head) * n * n;
    var z = [];
    for (var r = 0; r < n; r++) {
      var row = [];
      for (var c = 0; c < n; c++) {
        var q = mapBytes[start + r * n + c] / 255;
        row.push(scale * q * q);
      }
      z.push(row);
    }
    return z;
  }

  function openPanel(layer, head) {
    if (!(layer >= 0 && layer < L && head >= 0 && head < H)) return;
    var panel = byId("head-panel");
    panel.hidden = false;
    panel.setAttribute("data-layer", String(layer));
    panel.setAttribute("data-head", String(head));
    byId("panel-title").textContent = "Layer " + layer + ", head " + head;
    var kv = D.kv_heads ? "kv head " + Math.floor(head / Math.max(1, H / D.kv_heads)) + " of " + D.kv_heads : "";
    byId("panel-kv").textContent = kv;
    var idx = layer * H + head;

    var tags = byId("panel-tags");
    tags.textContent = "";
    var names = D.categories.tags[layer + "," + head] || ["mixed"];
    names.forEach(function (name) {
      var chip = el("span", "chip", name);
      var i = D.categories.names.indexOf(name);
      chip.style.backgroundColor = CATEGORY_COLOURS[(i < 0 ? 0 : i) % CATEGORY_COLOURS.length];
      var rule = D.categories.rules.filter(function (r) { return r.name === name; })[0];
      if (rule) chip.title = rule.metric + " " + rule.test + " " + rule.threshold + ": " + rule.help;
      tags.appendChild(chip);
    });

    var table = byId("panel-scores");
    table.textContent = "";
    var hr = el("tr");
    ["metric", "value", "\u00b1", "n", "rank"].forEach(function (c) { hr.appendChild(el("th", "", c)); });
    table.appendChild(hr);
    D.metrics.forEach(function (m) {
      var v = m.value[idx];
      var rank = "\u2013";
      if (v !== null) {
        var higher = 0, total = 0;
        m.value.forEach(function (x) { if (x !== null) { total++; if (x > v) higher++; } });
        rank = (higher + 1) + " / " + total;
      }
      var tr = el("tr");
      [m.probe === m.metric ? m.metric : m.probe + "/" + m.metric, fmt(v), fmt(m.stderr[idx], 2), m.n[idx], rank]
        .forEach(function (c) { tr.appendChild(el("td", "", c)); });
      table.appendChild(tr);
    });

    var maps = byId("panel-maps");
    maps.textContent = "";
    if (!D.maps) {
      maps.appendChild(el("p", "empty", "no attention map stored (probe attention_maps did not run)"));
    } else {
      D.maps.samples.forEach(function (s) {
        var cell = el("div");
        cell.appendChild(el("p", "map-title", "sample " + s.sample + " \u00b7 " + s.length + " tokens \u00b7 " + s.n + " x " + s.n + " bins"));
        var div = el("div", "map");
        div.setAttribute("data-sample", String(s.sample));
        cell.appendChild(div);
        maps.appendChild(cell);
        var every = step(s.n, 6);
        var ticks = range(s.n).filter(function (i) { return i % every === 0; });
        var z = mapCells(s, layer, head);
        var flat = [].concat.apply([], z);
        var top = quantile(flat, 0.98) || Math.max.apply(null, flat) || 1;
        var ends = s.starts.map(function (a, i) { return (i + 1 < s.starts.length ? s.starts[i + 1] : s.length) - 1; });
        var custom = z.map(function (row, r) { return row.map(function (_, c) { return [s.starts[r] + "\u2013" + ends[r], s.starts[c] + "\u2013" + ends[c]]; }); });
        plot(div, [{
          type: "heatmap", z: z, x: range(s.n), y: range(s.n), zmin: 0, zmax: top, colorscale: MAP_COLOURS,
          customdata: custom, colorbar: { thickness: 10, tickfont: { size: 10 } },
          hovertemplate: "queries %{customdata[0]}<br>keys %{customdata[1]}<br>mean p = %{z:.3g}<extra></extra>",
        }], {
          height: 270, margin: { l: 52, r: 4, t: 4, b: 40 },
          xaxis: { title: { text: "key position", standoff: 4 }, tickvals: ticks, ticktext: ticks.map(function (i) { return String(s.starts[i]); }),
                   tickangle: 0, range: [-0.5, s.n - 0.5], showgrid: false, zeroline: false },
          yaxis: { title: { text: "query position", standoff: 4 }, tickvals: ticks, ticktext: ticks.map(function (i) { return String(s.starts[i]); }),
                   range: [s.n - 0.5, -0.5], showgrid: false, zeroline: false },
        });
      });
    }
    panel.scrollTop = 0;
  }

  byId("panel-close").addEventListener("click", function () { byId("head-panel").hidden = true; });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") byId("head-panel").hidden = true; });

  renderCard();
  renderCategories();
  renderHeatmaps();
  renderStrips();
  renderSinks();
  renderTop();
  renderSettings();
  window.headmapReport = { openPanel: openPanel, layers: L, heads: H };
  Promise.all(pending).then(function () {
    document.body.setAttribute("data-ready", "1");
  });
})();
