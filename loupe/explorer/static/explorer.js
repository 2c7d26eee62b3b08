/* loupe view: the trajectory explorer. Plain JS, no network: data arrive as data/<key>.js scripts
   calling LOUPE.put(key, data), so the page works from file:// as well as from the local server. */
"use strict";

var LOUPE = (function () {
  var store = {}, waiting = {};
  function put(key, data) {
    store[key] = data;
    (waiting[key] || []).forEach(function (w) { w.resolve(data); });
    delete waiting[key];
  }
  function load(key, fresh) {
    if (store[key] && !fresh) return Promise.resolve(store[key]);
    return new Promise(function (resolve, reject) {
      (waiting[key] = waiting[key] || []).push({ resolve: resolve });
      var s = document.createElement("script");
      s.src = "data/" + key + ".js" + (fresh ? "?t=" + Date.now() : "");
      s.onerror = function () { reject(new Error("data/" + key + ".js is missing")); s.remove(); };
      s.onload = function () { s.remove(); };
      document.head.appendChild(s);
    });
  }
  return { put: put, load: load, store: store };
})();

(function () {
  var served = location.protocol === "http:" || location.protocol === "https:";
  var app = document.getElementById("app");
  var manifest = null, state = {}, timers = [], imgs = {};

  // -- helpers ---------------------------------------------------------------------------------------
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "html") e.innerHTML = attrs[k];
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x, d) { return x === null || x === undefined ? "–" : (+x).toFixed(d === undefined ? 3 : d); }
  function rgb(c, a) { return "rgba(" + Math.round(c[0] * 255) + "," + Math.round(c[1] * 255) + "," + Math.round(c[2] * 255) + "," + (a === undefined ? 1 : a) + ")"; }
  function image(src) {
    if (!imgs[src]) {
      imgs[src] = new Promise(function (resolve, reject) {
        var i = new Image();
        i.onload = function () { resolve(i); };
        i.onerror = function () { reject(new Error(src + " is missing")); };
        i.src = src;
      });
    }
    return imgs[src];
  }
  function message(text, cls) { app.innerHTML = ""; app.appendChild(el("p", { class: cls || "note", html: text })); }
  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var p = kv.split("=");
      out[decodeURIComponent(p[0])] = decodeURIComponent(p[1] || "");
    });
    return out;
  }
  function setHash(h) {
    var s = Object.keys(h).filter(function (k) { return h[k] !== undefined && h[k] !== null; })
      .map(function (k) { return encodeURIComponent(k) + "=" + encodeURIComponent(h[k]); }).join("&");
    if ("#" + s !== location.hash) history.replaceState(null, "", "#" + s);
  }
  function go(h) { location.hash = Object.keys(h).map(function (k) { return k + "=" + encodeURIComponent(h[k]); }).join("&"); }
  function stopTimers() { timers.forEach(clearInterval); timers = []; if (state.play) { clearInterval(state.play); state.play = null; } }
  function tile(idx, cols, w, h) { return [(idx % cols) * w, Math.floor(idx / cols) * h]; }

  // -- start -----------------------------------------------------------------------------------------
  LOUPE.load("manifest").then(function (m) {
    manifest = m;
    document.getElementById("title").textContent = m.title || "";
    window.addEventListener("hashchange", route);
    route();
  }).catch(function () {
    message("This bundle has no data (data/manifest.js is missing). Build it with <code>loupe view --probe DIR --export OUT</code>.", "error");
  });

  function views() {
    var v = [];
    var cks = manifest.checkpoints || [];
    if (cks.length) v.push(["traj", manifest.kind === "eval" ? "Replays" : "Trajectories"]);
    if (cks.some(function (c) { return c.embedding !== false; })) v.push(["embed", "Embedding"]);
    if (manifest.kind === "run") v.unshift(["run", "Run"]);
    if (manifest.kind === "eval") v.unshift(["eval", "Evaluation"]);
    return v;
  }

  function route() {
    stopTimers();
    // the page is ready again only once the new view has drawn (tests and scripts wait on this)
    app.removeAttribute("data-ready");
    var h = parseHash(), vs = views();
    var view = h.view || (vs[0] && vs[0][0]);
    var nav = document.getElementById("nav");
    nav.innerHTML = "";
    vs.forEach(function (v) {
      var a = el("a", { href: "#view=" + v[0] + (h.ckpt ? "&ckpt=" + h.ckpt : ""), text: v[1] });
      if (v[0] === view) a.className = "active";
      nav.appendChild(a);
    });
    var run = { traj: trajectoryView, embed: embedView, run: runView, eval: evalView }[view];
    if (!run) { message("Unknown view " + view + "."); return; }
    Promise.resolve(run(h)).catch(function (e) { message(String(e.message || e), "error"); });
  }

  function ckptKey(h) {
    var keys = (manifest.checkpoints || []).map(function (c) { return c.key; });
    if (h.ckpt && keys.indexOf(h.ckpt) >= 0) return h.ckpt;
    if (h.ckpt) throw new Error("This bundle has no trajectory page for checkpoint " + h.ckpt + ".");
    if (!keys.length) throw new Error("This bundle holds no trajectories.");
    return keys[keys.length - 1];
  }

  // -- trajectory page -------------------------------------------------------------------------------
  function trajectoryView(h) {
    var key = ckptKey(h);
    return LOUPE.load(key + "/meta").then(function (meta) {
      var ti = Math.max(0, Math.min(meta.trajectories - 1, parseInt(h.traj || "0", 10) || 0));
      return LOUPE.load(key + "/traj-" + ti).then(function (traj) { buildTrajectory(key, meta, traj, h); });
    });
  }

  function buildTrajectory(key, meta, traj, h) {
    var base = "data/" + key + "/";
    var s = state = {
      key: key, meta: meta, traj: traj, frame: Math.max(0, Math.min(traj.frames - 1, parseInt(h.frame || "0", 10) || 0)),
      target: meta.targets.indexOf(h.target) >= 0 ? h.target : meta.targets[0],
      overlay: h.overlay || "none", isolate: null, fps: parseFloat(h.fps || "8"), play: null,
    };
    var sprites = {};
    app.innerHTML = "";
    var left = el("div", { class: "side" }), mid = el("div"), right = el("div", { class: "side" });
    app.appendChild(el("div", { class: "traj" }, [left, mid, right]));

    // trajectory list and bookmarks
    left.appendChild(el("h3", { text: "Trajectories" }));
    var list = el("div", { class: "trajlist" });
    for (var i = 0; i < meta.trajectories; i++) {
      (function (i) {
        var b = el("button", { onclick: function () { go(hashFor({ traj: i, frame: 0 })); } },
          [el("span", { class: "thumb", style: "background-image:url('" + base + "traj-" + i + "-frames.png');background-size:" + (32 * Math.min(meta.frames, 64)) + "px auto" }), "trajectory " + i]);
        if (i === traj.index) b.className = "active";
        list.appendChild(b);
      })(i);
    }
    left.appendChild(list);
    left.appendChild(el("h3", { text: "GAE bookmarks" }));
    var bm = el("div", { class: "bookmarks", id: "bookmarks" });
    meta.bookmarks.forEach(function (m) {
      bm.appendChild(el("button", {
        class: m.kind, title: "advantage " + fmt(m.advantage) + ", value " + fmt(m.value),
        "data-traj": m.env, "data-frame": m.t,
        onclick: function () {
          if (m.env === traj.index) { setFrame(m.t); } else { go(hashFor({ traj: m.env, frame: m.t })); }
        },
      }, [(m.kind === "high" ? "▲ " : "▼ ") + "traj " + m.env + ", frame " + m.t + " (" + fmt(m.advantage, 2) + ")"]));
    });
    if (!meta.bookmarks.length) bm.appendChild(el("p", { class: "note", text: "no bookmarks" }));
    left.appendChild(bm);

    // controls
    var targetSel = el("select", { id: "target", onchange: function () { s.target = targetSel.value; draw(); } });
    meta.targets.forEach(function (t) { targetSel.appendChild(el("option", { value: t, text: targetLabel(t) })); });
    targetSel.value = s.target;
    var overlaySel = el("select", { id: "overlay", onchange: function () { s.overlay = overlaySel.value; draw(); } });
    overlaySel.appendChild(el("option", { value: "none", text: "none" }));
    Object.keys(meta.saliency).forEach(function (n) { overlaySel.appendChild(el("option", { value: n, text: n === "attention" ? "attention" : n + " saliency" + (meta.saliency[n].sampled && meta.saliency_sample && meta.saliency_sample.mode === "sample" ? " (some frames)" : "") })); });
    overlaySel.value = meta.saliency[s.overlay] ? s.overlay : "none";
    s.overlay = overlaySel.value;
    var playBtn = el("button", { id: "play", onclick: togglePlay, text: "▶ play" });
    var speed = el("select", { id: "speed", onchange: function () { s.fps = parseFloat(speed.value); if (s.play) { togglePlay(); togglePlay(); } } });
    [2, 4, 8, 15, 30].forEach(function (f) { speed.appendChild(el("option", { value: f, text: f + " fps" })); });
    speed.value = String(s.fps);
    mid.appendChild(el("div", { class: "controls" }, [
      el("button", { onclick: function () { setFrame(0); }, text: "|◀ first" }),
      el("button", { id: "prev", onclick: function () { setFrame(s.frame - 1); }, text: "◀ step" }),
      playBtn,
      el("button", { id: "next", onclick: function () { setFrame(s.frame + 1); }, text: "step ▶" }),
      speed,
      el("label", { text: "target" }), targetSel,
      el("label", { text: "observation overlay" }), overlaySel,
      el("span", { id: "frameinfo" }),
    ]));

    // panes
    var size = 256;
    function pane(id, label) {
      var c = el("canvas", { id: id, width: size, height: size });
      return [c, el("div", { class: "pane" }, [c, el("div", { class: "label", text: label })])];
    }
    var obsP = pane("obs", "observation"), posP = pane("pos", "good news (positive attribution)"), negP = pane("neg", "bad news (negative attribution)");
    mid.appendChild(el("div", { class: "panes" }, [obsP[1], posP[1], negP[1]]));
    var salNote = el("div", { class: "note", id: "salnote" });
    mid.appendChild(salNote);
    if (meta.replay) mid.insertBefore(replayBanner(meta.replay), mid.firstChild);
    mid.appendChild(holdsNote(meta));
    var salIndex = {}, salFrames = traj.saliency_frames || {};
    Object.keys(salFrames).forEach(function (kind) { salIndex[kind] = {}; salFrames[kind].forEach(function (t, k) { salIndex[kind][t] = k; }); });

    // timeline strip and graphs
    var strip = el("canvas", { id: "strip", height: 64, width: Math.min(traj.frames * 8, 2048) });
    var cursor = el("div", { class: "cursor" });
    var timeline = el("div", { class: "timeline", id: "timeline" }, [strip, cursor]);
    mid.appendChild(timeline);
    var graphs = el("div", { class: "graphs" });
    mid.appendChild(graphs);
    var series = [["value", traj.value], ["advantage", traj.advantage], ["reward", traj.reward], ["chosen action prob.", traj.chosen_prob]];
    if (traj.attention_entropy) series.push(["attention entropy", traj.attention_entropy]);
    var cursors = series.map(function (sr) { return graph(graphs, sr[0], sr[1], traj.done, setFrame); });
    function dragTo(ev) {
      var r = strip.getBoundingClientRect();
      setFrame(Math.floor((ev.clientX - r.left) / r.width * traj.frames));
    }
    timeline.addEventListener("mousedown", function (ev) {
      dragTo(ev);
      function move(e) { dragTo(e); }
      function up() { window.removeEventListener("mousemove", move); window.removeEventListener("mouseup", up); }
      window.addEventListener("mousemove", move); window.addEventListener("mouseup", up);
    });

    // legend, frame details, policy bar
    right.appendChild(el("h3", { text: "Features (" + meta.layer + ")" }));
    var legend = el("div", { class: "legend", id: "legend" });
    meta.entries.forEach(function (en, e) {
      var item = el("div", { class: "entry", "data-entry": e, title: en.examples ? "click for dataset examples" : "" }, [
        el("span", { class: "swatch", style: "background:" + rgb(en.colour) }),
        en.examples ? el("img", { src: base + en.examples, alt: en.name }) : null,
        el("span", { text: en.name }),
      ]);
      item.addEventListener("mouseenter", function () { s.isolate = e; item.classList.add("on"); draw(); });
      item.addEventListener("mouseleave", function () { s.isolate = null; item.classList.remove("on"); draw(); });
      item.addEventListener("click", function () { if (en.examples) featurePopup(base, en); });
      legend.appendChild(item);
    });
    right.appendChild(legend);
    right.appendChild(el("h3", { text: "Policy" }));
    var policy = el("div", { class: "policy", id: "policy" });
    right.appendChild(policy);
    right.appendChild(el("h3", { text: "Checkpoint" }));
    right.appendChild(el("div", { class: "note", html: "step " + meta.step + "<br>" + meta.policy + ", layer " + meta.layer + "<br>sha256 " + String(meta.sha256).slice(0, 12) }));

    function hashFor(extra) {
      var o = { view: "traj", ckpt: key, traj: traj.index, frame: s.frame, target: s.target, overlay: s.overlay };
      for (var k in extra) o[k] = extra[k];
      return o;
    }
    function setFrame(f) {
      s.frame = Math.max(0, Math.min(traj.frames - 1, f));
      draw();
    }
    function togglePlay() {
      if (s.play) { clearInterval(s.play); s.play = null; playBtn.textContent = "▶ play"; return; }
      playBtn.textContent = "⏸ pause";
      s.play = setInterval(function () { setFrame(s.frame + 1 >= traj.frames ? 0 : s.frame + 1); }, 1000 / s.fps);
    }
    document.onkeydown = function (ev) {
      if (ev.target.tagName === "SELECT" || ev.target.tagName === "INPUT") return;
      if (ev.key === "ArrowRight") { setFrame(s.frame + 1); ev.preventDefault(); }
      else if (ev.key === "ArrowLeft") { setFrame(s.frame - 1); ev.preventDefault(); }
      else if (ev.key === " ") { togglePlay(); ev.preventDefault(); }
      else if (ev.key === "Escape") { document.getElementById("popup").hidden = true; }
    };

    var need = [["frames", base + "traj-" + traj.index + "-frames.png"]];
    meta.targets.forEach(function (t) {
      if (!meta.attribution[t]) return;
      ["pos", "neg"].forEach(function (sg) { need.push(["attr/" + t + "/" + sg, base + "traj-" + traj.index + "-attr-" + t.replace(":", "-") + "-" + sg + ".png"]); });
    });
    Object.keys(meta.saliency).forEach(function (n) { need.push(["sal/" + n, base + "traj-" + traj.index + "-sal-" + n + ".png"]); });
    var small = document.createElement("canvas"), tmp = document.createElement("canvas");

    function drawFrame(ctx, dim) {
      var fw = meta.obs_hw[1], fh = meta.obs_hw[0], p = tile(s.frame, traj.frame_cols, fw, fh);
      ctx.globalCompositeOperation = "source-over";
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(sprites.frames, p[0], p[1], fw, fh, 0, 0, size, size);
      if (dim) { ctx.fillStyle = "rgba(0,0,0," + dim + ")"; ctx.fillRect(0, 0, size, size); }
    }
    function drawAttribution(ctx, sign) {
      drawFrame(ctx, 0.55);
      var info = meta.attribution[s.target], img = sprites["attr/" + s.target + "/" + sign];
      if (!info || !img) return;
      var lh = meta.layer_hw[0], lw = meta.layer_hw[1], n = meta.entries.length;
      small.width = lw; small.height = lh; tmp.width = lw; tmp.height = lh;
      var sc = small.getContext("2d"), tc = tmp.getContext("2d");
      sc.globalCompositeOperation = "source-over"; sc.fillStyle = "#000"; sc.fillRect(0, 0, lw, lh);
      for (var e = 0; e < n; e++) {
        if (s.isolate !== null && s.isolate !== e) continue;
        var p = tile(s.frame * n + e, info.cols, lw, lh);
        tc.globalCompositeOperation = "copy";
        tc.drawImage(img, p[0], p[1], lw, lh, 0, 0, lw, lh);
        tc.globalCompositeOperation = "multiply";
        tc.fillStyle = rgb(meta.entries[e].colour);
        tc.fillRect(0, 0, lw, lh);
        sc.globalCompositeOperation = "lighter";
        sc.drawImage(tmp, 0, 0);
      }
      ctx.imageSmoothingEnabled = true;
      ctx.globalCompositeOperation = "lighter";
      ctx.drawImage(small, 0, 0, size, size);
      ctx.globalCompositeOperation = "source-over";
    }
    function nearestSaliency(t, kind) {
      var fs = salFrames[kind] || [], before = null, after = null;
      fs.forEach(function (f) { if (f < t) before = f; else if (f > t && after === null) after = f; });
      return [before, after];
    }
    function drawObservation(ctx) {
      var img = sprites["sal/" + s.overlay], info = meta.saliency[s.overlay];
      var idx = info && info.sampled ? (salIndex[s.overlay] || {})[s.frame] : s.frame;
      salNote.innerHTML = "";
      if (img && idx === undefined) {
        var near = nearestSaliency(s.frame, s.overlay);
        salNote.appendChild(document.createTextNode("No " + s.overlay + " saliency at frame " + s.frame + ": this bundle has it " + (info.where || "at some frames") + ". "));
        near.forEach(function (f, j) {
          if (f === null) return;
          salNote.appendChild(el("button", { class: "salnear", "data-frame": f, onclick: function () { setFrame(f); }, text: (j ? "next: frame " : "previous: frame ") + f }));
          salNote.appendChild(document.createTextNode(" "));
        });
        salNote.appendChild(el("span", { html: "Every frame: rebuild with <code>--saliency all</code>." }));
        img = null;
      }
      drawFrame(ctx, img ? 0.45 : 0);
      if (!img) return;
      var tl = info.tile || meta.obs_hw;
      var fw = tl[1], fh = tl[0], p = tile(idx, info.cols, fw, fh);
      tmp.width = fw; tmp.height = fh;
      var tc = tmp.getContext("2d");
      tc.globalCompositeOperation = "copy"; tc.drawImage(img, p[0], p[1], fw, fh, 0, 0, fw, fh);
      tc.globalCompositeOperation = "multiply"; tc.fillStyle = s.overlay === "attention" ? "#ff4040" : "#ffd000"; tc.fillRect(0, 0, fw, fh);
      ctx.imageSmoothingEnabled = true; ctx.globalCompositeOperation = "lighter";
      ctx.drawImage(tmp, 0, 0, size, size);
      ctx.globalCompositeOperation = "source-over";
    }
    function drawStrip() {
      var ctx = strip.getContext("2d"), fw = meta.obs_hw[1], fh = meta.obs_hw[0], cw = strip.width / traj.frames;
      ctx.imageSmoothingEnabled = false;
      for (var t = 0; t < traj.frames; t++) {
        var p = tile(t, traj.frame_cols, fw, fh);
        // a column slice of each frame, from its middle, as the article's timeline does
        var sw = Math.max(1, Math.round(fw * cw / strip.height));
        ctx.drawImage(sprites.frames, p[0] + (fw - sw) / 2, p[1], sw, fh, t * cw, 0, Math.ceil(cw), strip.height);
      }
      ctx.fillStyle = "#fff";
      traj.done.forEach(function (d, t) { if (d) ctx.fillRect((t + 1) * cw - 1, 0, 2, strip.height); });
    }
    function drawPolicy() {
      policy.innerHTML = "";
      var pr = traj.probs[s.frame], a = traj.action[s.frame];
      pr.forEach(function (p, i) {
        policy.appendChild(el("div", { class: "bar" + (i === a ? " taken" : "") }, [
          el("span", { class: "n", text: meta.actions[i] }), el("div", { class: "b", style: "width:" + Math.round(p * 120) + "px" }), el("span", { text: fmt(p, 2) })]));
      });
    }
    function draw() {
      if (!sprites.frames) return;
      drawObservation(obsP[0].getContext("2d"));
      drawAttribution(posP[0].getContext("2d"), "pos");
      drawAttribution(negP[0].getContext("2d"), "neg");
      var t = s.frame, a = traj.action[t];
      document.getElementById("frameinfo").textContent = "frame " + t + " / " + (traj.frames - 1) + " · action " + meta.actions[a] +
        " · reward " + fmt(traj.reward[t], 2) + " · value " + fmt(traj.value[t]) + (traj.done[t] ? " · episode ends" : "") +
        (traj.attention_entropy ? " · attention entropy " + fmt(traj.attention_entropy[t], 2) : "");
      cursor.style.left = (strip.offsetWidth * (t + 0.5) / traj.frames) + "px";
      cursors.forEach(function (c) { c(t); });
      drawPolicy();
      app.setAttribute("data-frame", t);
      setHash(hashFor({}));
    }
    return Promise.all(need.map(function (n) { return image(n[1]).then(function (i) { sprites[n[0]] = i; }); })).then(function () {
      drawStrip();
      draw();
      app.setAttribute("data-ready", "1");
    });
  }

  function holdsNote(meta) {
    var req = meta.on_request || {}, ss = meta.saliency_sample || {}, cmd = req.rebuild || "loupe view ...";
    var items = [];
    items.push(el("li", { html: "Attribution (integrated gradients at layer " + meta.layer + ", " + (req.ig_steps || "?") + " steps) at every frame to: " +
      meta.targets.map(function (t) { return "<code>" + t + "</code>"; }).join(", ") + ". Other targets: <code>" + cmd + " --target value --target logit:I</code>" +
      (req.common_logit ? " (the most frequent action here is <code>" + req.common_logit + "</code>" + ")" : "") + "; <code>--target</code> repeats." }));
    var kinds = Object.keys(meta.saliency).filter(function (n) { return meta.saliency[n].sampled; });
    if (ss.mode === "none" || !kinds.length) items.push(el("li", { html: "No saliency maps; <code>" + cmd + " --saliency sample</code> (or <code>all</code>) adds them." }));
    else if (ss.mode === "sample") items.push(el("li", { html: "Saliency of the value: " + kinds.map(function (k) { return k + " " + meta.saliency[k].where; }).join("; ") +
      ". Every frame: <code>" + cmd + " --saliency all</code>; denser: <code>--saliency-every N</code>." }));
    else items.push(el("li", { text: "Saliency (" + kinds.join(", ") + ") of the value at every frame." }));
    if (meta.saliency.attention) items.push(el("li", { text: "Attention maps and their entropy at every frame." }));
    items.push(el("li", { text: meta.nmf_source === "trajectories" ? "NMF features fitted on these frames' value attributions (no probe of this checkpoint was found, so no dataset examples)." :
      "NMF features of the checkpoint's probe, with its dataset examples." }));
    var d = el("details", { id: "holds", class: "holds" }, [el("summary", { text: "What this page holds, and how to get more" }), el("ul", {}, items)]);
    return d;
  }

  function replayBanner(r) {
    var ok = r.match;
    var text = "Replay of level " + r.level + " (" + r.recorded.category.replace("_", " ") + ") of " + r.label + ": level seed " + r.level + ", " + r.recorded.length +
      " recorded actions. Replayed: " + r.replayed.category.replace("_", " ") + " after " + r.replayed.length + " steps, return " + fmt(r.replayed.ret, 1) +
      (ok ? " — the same as the evaluation recorded." : " — NOT what the evaluation recorded (" + r.recorded.category + " after " + r.recorded.length + " steps).");
    return el("p", { class: ok ? "note replay" : "error replay", id: "replay", "data-match": ok ? "1" : "0" }, [text + " ", el("a", { href: "#view=eval", text: "back to the evaluation" })]);
  }

  function targetLabel(t) {
    if (t === "value") return "value";
    var p = t.split(":");
    var meta = state.meta || {};
    if (p[0] === "logit") return "logit " + p[1] + ((meta.actions && meta.actions[+p[1]]) ? " (" + meta.actions[+p[1]] + ")" : "");
    return "action group " + p[1];
  }

  function graph(parent, name, ys, done, onPick) {
    var w = 1000, h = 64, n = ys.length;
    var vals = ys.filter(function (y) { return y !== null; });
    var lo = Math.min.apply(null, vals.concat([0])), hi = Math.max.apply(null, vals.concat([0]));
    if (hi === lo) hi = lo + 1;
    function X(i) { return (i + 0.5) / n * w; }
    function Y(y) { return h - 4 - (y - lo) / (hi - lo) * (h - 8); }
    var s = svg("svg", { viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", "data-series": name });
    done.forEach(function (d, i) { if (d) s.appendChild(svg("line", { x1: X(i) + w / n / 2, x2: X(i) + w / n / 2, y1: 0, y2: h, stroke: "#bbb", "stroke-dasharray": "3,3", "vector-effect": "non-scaling-stroke" })); });
    s.appendChild(svg("line", { x1: 0, x2: w, y1: Y(0), y2: Y(0), stroke: "#e0e0e0", "vector-effect": "non-scaling-stroke" }));
    var d = ys.map(function (y, i) { return (i ? "L" : "M") + X(i).toFixed(1) + "," + Y(y || 0).toFixed(1); }).join("");
    s.appendChild(svg("path", { d: d, fill: "none", stroke: "#1f6feb", "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }));
    var cur = svg("line", { y1: 0, y2: h, stroke: "#e65100", "stroke-width": 2, "vector-effect": "non-scaling-stroke" });
    s.appendChild(cur);
    var label = el("div", { class: "note", text: name + "  [" + fmt(lo, 2) + ", " + fmt(hi, 2) + "]" });
    parent.appendChild(label);
    parent.appendChild(s);
    s.addEventListener("click", function (ev) { var r = s.getBoundingClientRect(); onPick(Math.floor((ev.clientX - r.left) / r.width * n)); });
    return function (t) { cur.setAttribute("x1", X(t)); cur.setAttribute("x2", X(t)); label.textContent = name + " = " + fmt(ys[t]) + "   [" + fmt(lo, 2) + ", " + fmt(hi, 2) + "]"; };
  }

  function featurePopup(base, en) {
    var p = document.getElementById("popup");
    p.innerHTML = "";
    p.appendChild(el("h2", { text: en.name + ": dataset examples (left) and spatially aware examples (right)" }));
    p.appendChild(el("img", { src: base + en.examples, alt: "dataset examples" }));
    if (en.spatial) p.appendChild(el("img", { src: base + en.spatial, alt: "spatially aware examples" }));
    p.appendChild(el("div", {}, [el("button", { onclick: function () { p.hidden = true; }, text: "close (Esc)" })]));
    p.hidden = false;
  }

  // -- embedding -------------------------------------------------------------------------------------
  function embedView(h) {
    var key = ckptKey(h);
    return LOUPE.load(key + "/meta").then(function (meta) {
      if (!meta.embedding) { message("This bundle has no embedding (it was built with --no-embedding)."); app.setAttribute("data-ready", "1"); return null; }
      return Promise.all([meta, LOUPE.load(key + "/embedding")]);
    }).then(function (r) {
      if (!r) return;
      var meta = r[0], em = r[1];
      app.innerHTML = "";
      if (!em.points.length) { message(em.error || "no embedding"); return; }
      var by = el("select", { id: "colour" });
      ["value", "action", "feature"].forEach(function (c) { by.appendChild(el("option", { value: c, text: "colour by " + c })); });
      by.value = h.colour || "value";
      var size = 520, c = el("canvas", { id: "embedding", width: size, height: size });
      var info = el("div", { class: "note", id: "pointinfo", text: "t-SNE of the activations at layer " + meta.layer + "; click a point to open its frame." });
      var legend = el("div", { class: "legend" });
      var preview = el("canvas", { id: "preview", width: 128, height: 128 });
      app.appendChild(el("div", { class: "controls" }, [by]));
      app.appendChild(el("div", { class: "embed" }, [c, el("div", {}, [info, preview, legend])]));
      function show(p) {
        var fw = meta.obs_hw[1], fh = meta.obs_hw[0], cols = Math.max(1, Math.min(meta.frames, Math.floor(4096 / fw)));
        image("data/" + key + "/traj-" + p[2] + "-frames.png").then(function (img) {
          var q = tile(p[3], cols, fw, fh), ctx = preview.getContext("2d");
          ctx.imageSmoothingEnabled = false;
          ctx.drawImage(img, q[0], q[1], fw, fh, 0, 0, 128, 128);
        });
      }
      var pts = em.points;
      function colour(p) {
        var mode = by.value;
        if (mode === "value") {
          var lo = Math.min.apply(null, pts.map(function (q) { return q[4]; })), hi = Math.max.apply(null, pts.map(function (q) { return q[4]; }));
          var t = hi > lo ? (p[4] - lo) / (hi - lo) : 0.5;
          return "hsl(" + (240 - 240 * t) + ",80%,45%)";
        }
        if (mode === "action") return "hsl(" + (p[5] * 360 / meta.actions.length) + ",75%,45%)";
        var en = meta.entries[p[6]];
        return en ? rgb(en.colour) : "#999";
      }
      function draw() {
        var ctx = c.getContext("2d");
        ctx.clearRect(0, 0, size, size);
        pts.forEach(function (p) { ctx.fillStyle = colour(p); ctx.beginPath(); ctx.arc(10 + p[0] * (size - 20), 10 + p[1] * (size - 20), 3, 0, 7); ctx.fill(); });
        legend.innerHTML = "";
        if (by.value === "action") meta.actions.forEach(function (a, i) { legend.appendChild(el("div", { class: "entry" }, [el("span", { class: "swatch", style: "background:hsl(" + (i * 360 / meta.actions.length) + ",75%,45%)" }), a])); });
        if (by.value === "feature") meta.entries.forEach(function (en) { if (!en.residual) legend.appendChild(el("div", { class: "entry" }, [el("span", { class: "swatch", style: "background:" + rgb(en.colour) }), en.name])); });
        if (by.value === "value") legend.appendChild(el("div", { class: "note", text: "blue: low value, red: high value" }));
      }
      function nearest(ev) {
        var r = c.getBoundingClientRect(), x = (ev.clientX - r.left - 10) / (size - 20), y = (ev.clientY - r.top - 10) / (size - 20), best = null, bd = 1e9;
        pts.forEach(function (p) { var d = (p[0] - x) * (p[0] - x) + (p[1] - y) * (p[1] - y); if (d < bd) { bd = d; best = p; } });
        return best;
      }
      c.addEventListener("mousemove", function (ev) { var p = nearest(ev); if (p) { info.textContent = "trajectory " + p[2] + ", frame " + p[3] + ", value " + fmt(p[4]) + ", action " + meta.actions[p[5]]; show(p); } });
      c.addEventListener("click", function (ev) { var p = nearest(ev); if (p) go({ view: "traj", ckpt: key, traj: p[2], frame: p[3] }); });
      by.addEventListener("change", draw);
      draw();
      app.setAttribute("data-ready", "1");
    });
  }

  // -- run page --------------------------------------------------------------------------------------
  function runView() {
    function render(data) {
      app.innerHTML = "";
      app.appendChild(el("h2", { text: "Run " + (data.run_id || data.run) + " · " + (data.policy || "") + " on " + (data.env || "") }));
      app.appendChild(el("p", { class: "note", text: data.checkpoints + " checkpoint(s), " + data.points.length + " probed · updated " + data.updated + (served ? " · refreshes every 5 s" : "") }));
      if (!data.points.length) {
        app.appendChild(el("p", { class: "error", id: "empty", html: "No checkpoint of this run has been probed yet. Start probe workers with <code>loupe probe --run " + data.run + "</code>; this page shows their results as they arrive." }));
        app.setAttribute("data-ready", "1");
        return;
      }
      var charts = el("div", { class: "charts" });
      data.scalars.forEach(function (name) {
        var pts = data.points.filter(function (p) { return p[name] !== null && p[name] !== undefined; });
        if (!pts.length) return;
        charts.appendChild(lineChart(name, pts, name));
      });
      app.appendChild(charts);
      var table = el("table", { id: "checkpoints" });
      table.appendChild(el("tr", {}, ["step"].concat(data.scalars).concat(["trajectories"]).map(function (c) { return el("th", { text: c }); })));
      data.points.forEach(function (p) {
        var cells = [el("td", { text: String(p.step) })];
        data.scalars.forEach(function (n) { cells.push(el("td", { text: fmt(p[n]) })); });
        cells.push(el("td", {}, [p.key ? el("a", { href: "#view=traj&ckpt=" + p.key, text: "open" }) : el("span", { class: "note", text: "not built" })]));
        table.appendChild(el("tr", {}, cells));
      });
      app.appendChild(table);
      app.setAttribute("data-ready", "1");
    }
    function lineChart(name, pts, key) {
      var w = 360, h = 180, pad = 34;
      var xs = pts.map(function (p) { return p.step; }), ys = pts.map(function (p) { return p[key]; });
      var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
      if (x1 === x0) { x0 -= 1; x1 += 1; }
      if (y1 === y0) { y0 -= 1; y1 += 1; }
      function X(x) { return pad + (x - x0) / (x1 - x0) * (w - pad - 10); }
      function Y(y) { return h - 20 - (y - y0) / (y1 - y0) * (h - 40); }
      var s = svg("svg", { viewBox: "0 0 " + w + " " + h, "data-scalar": name });
      s.appendChild(svg("path", { d: pts.map(function (p, i) { return (i ? "L" : "M") + X(p.step) + "," + Y(p[key]); }).join(""), fill: "none", stroke: "#1f6feb", "stroke-width": 1.5 }));
      [[y0, Y(y0)], [y1, Y(y1)]].forEach(function (t) { var tx = svg("text", { x: 2, y: t[1] + 4, "font-size": 10, fill: "#777" }); tx.textContent = fmt(t[0], 3); s.appendChild(tx); });
      var sx = Math.min.apply(null, xs), ex = Math.max.apply(null, xs);
      var xl = svg("text", { x: w - 10, y: h - 4, "font-size": 10, fill: "#777", "text-anchor": "end" }); xl.textContent = "step " + (sx === ex ? sx : sx + " – " + ex); s.appendChild(xl);
      pts.forEach(function (p) {
        var c = svg("circle", { cx: X(p.step), cy: Y(p[key]), r: 4, fill: p.key ? "#1f6feb" : "#aaa", style: p.key ? "cursor:pointer" : "" });
        var t = svg("title", {}); t.textContent = "step " + p.step + ": " + fmt(p[key]) + (p.key ? " (click: trajectories)" : ""); c.appendChild(t);
        if (p.key) c.addEventListener("click", function () { go({ view: "traj", ckpt: p.key }); });
        s.appendChild(c);
      });
      return el("div", { class: "chart" }, [el("div", { text: name.replace(/_/g, " ") }), s]);
    }
    return LOUPE.load("run").then(function (data) {
      render(data);
      if (served) timers.push(setInterval(function () {
        LOUPE.load("run", true).then(function (d) {
          if (d.updated !== data.updated) {
            data = d;
            LOUPE.load("manifest", true).then(function (m) { manifest = m; render(d); });
          }
        }).catch(function () {});
      }, 5000));
    });
  }

  // -- evaluation page -------------------------------------------------------------------------------
  function evalView() {
    var cats = ["complete", "timeout", "saw", "enemy_left", "enemy_right", "lava", "multiple", "failure"];
    var colours = { complete: "#2e7d32", timeout: "#9e9e9e", saw: "#6a1b9a", enemy_left: "#ef6c00", enemy_right: "#f9a825", lava: "#c62828", multiple: "#455a64", failure: "#000" };
    function render(data) {
      app.innerHTML = "";
      app.appendChild(el("h2", { text: "Evaluation: " + data.levels + " levels from level " + data.start_level + " per checkpoint" }));
      if (!data.complete) app.appendChild(el("p", { class: "error", id: "inprogress", text: "This evaluation is still being written: the figures below cover the levels finished so far" + (served ? " and refresh every 5 s." : ".") }));
      var prog = el("table", {});
      data.checkpoints.forEach(function (c) {
        prog.appendChild(el("tr", {}, [el("td", { text: c.label }), el("td", {}, [el("span", { class: "progress" }, [el("div", { style: "width:" + Math.round(100 * c.done / Math.max(1, c.levels)) + "%" })])]), el("td", { text: c.done + " / " + c.levels + " levels" })]));
      });
      app.appendChild(prog);
      var present = cats.filter(function (k) { return data.checkpoints.some(function (c) { return c.by_category && c.by_category[k]; }); });
      var table = el("table", { id: "outcomes" });
      table.appendChild(el("tr", {}, [el("th", { text: "outcome" })].concat(data.checkpoints.map(function (c) { return el("th", { text: c.label }); }))));
      present.forEach(function (k) {
        table.appendChild(el("tr", {}, [el("td", {}, [el("span", { class: "swatch", style: "display:inline-block;width:10px;height:10px;margin-right:6px;background:" + colours[k] }), k.replace("_", " ")])].concat(data.checkpoints.map(function (c) {
          var v = c.by_category && c.by_category[k];
          return el("td", { text: v ? fmt(v.percent, 1) + "% [" + fmt(v.ci95[0], 1) + ", " + fmt(v.ci95[1], 1) + "] (" + v.count + ")" : "–" });
        }))));
      });
      app.appendChild(el("h3", { text: "Outcomes with 95% Wilson intervals" }));
      app.appendChild(table);
      app.appendChild(barChart(present, data.checkpoints, colours));
      app.appendChild(el("h3", { text: "Failed levels by cause" }));
      var live = served && data.replay_api;
      app.appendChild(el("p", { class: "note", id: "replaynote", html: "A failed level opens as a trajectory page: its episode replayed from the level seed and the recorded actions, then attributed. " +
        (live ? "Click any level; levels not replayed yet are replayed now (a few seconds)." :
          "Linked levels are replayed in this bundle; others: <code>loupe view --eval " + data.dir + " --replay LEVEL</code> (repeatable, or <code>--replays N</code> per cause), or serve it with <code>loupe view --eval " + data.dir + "</code> and click.") }));
      data.checkpoints.forEach(function (c) {
        var f = c.failed_levels || {}, reps = c.replays || {};
        var box = el("div", { class: "levels", "data-label": c.label }, [el("b", { text: c.name || c.label })]);
        if (c.without_actions) box.appendChild(el("div", { class: "error", text: c.without_actions + " failed level(s) have no recorded actions (evaluated before loupe recorded them) and cannot be replayed; evaluate again into a new --out." }));
        Object.keys(f).forEach(function (k) {
          var list = el("div", { class: "levellist" }), n = 0;
          f[k].forEach(function (lv) {
            var key = reps[String(lv)];
            if (key) { n++; list.appendChild(el("a", { href: "#view=traj&ckpt=" + encodeURIComponent(key), class: "level replayed", "data-level": lv, text: String(lv) })); }
            else if (live) list.appendChild(el("button", { class: "level", "data-level": lv, text: String(lv), onclick: function (ev) { replayOnDemand(c.label, lv, ev.target); } }));
            else list.appendChild(el("span", { class: "level", "data-level": lv, title: "not replayed in this bundle", text: String(lv) }));
            list.appendChild(document.createTextNode(" "));
          });
          box.appendChild(el("details", { "data-cause": k }, [el("summary", { text: k.replace("_", " ") + ": " + f[k].length + " level(s)" + (n ? ", " + n + " replayed" : "") }), list]));
        });
        if (!Object.keys(f).length) box.appendChild(el("div", { text: "no failed levels" }));
        app.appendChild(box);
      });
      app.setAttribute("data-ready", "1");
    }
    function replayOnDemand(label, level, btn) {
      btn.disabled = true;
      btn.textContent = level + " (replaying…)";
      fetch("api/replay?label=" + encodeURIComponent(label) + "&level=" + level, { method: "POST", headers: { "X-Loupe-Request": "1" } })
        .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || ("status " + r.status)); return j; }); })
        .then(function (j) { return LOUPE.load("manifest", true).then(function (m) { manifest = m; go({ view: "traj", ckpt: j.key }); }); })
        .catch(function (e) { btn.disabled = false; btn.textContent = String(level); btn.classList.add("failed"); btn.title = String(e.message || e); app.appendChild(el("p", { class: "error", id: "replayerror", text: "Level " + level + " could not be replayed: " + (e.message || e) })); });
    }
    function barChart(present, cks, colours) {
      var w = 720, rowH = 22, h = present.length * (cks.length * rowH + 10) + 20;
      var s = svg("svg", { viewBox: "0 0 " + w + " " + h, width: w, height: h, id: "bars", class: "bars" });
      var y = 10;
      present.forEach(function (k) {
        cks.forEach(function (c, j) {
          var v = c.by_category && c.by_category[k];
          var t = svg("text", { x: 0, y: y + 14, "font-size": 11, fill: "#555" }); t.textContent = k.replace("_", " ") + " · " + c.label; s.appendChild(t);
          if (v) {
            var X = function (p) { return 220 + p / 100 * (w - 240); };
            s.appendChild(svg("rect", { x: 220, y: y + 3, width: X(v.percent) - 220, height: rowH - 8, fill: colours[k], opacity: 0.35 + 0.5 * (j === 0) }));
            s.appendChild(svg("line", { x1: X(v.ci95[0]), x2: X(v.ci95[1]), y1: y + rowH / 2, y2: y + rowH / 2, stroke: "#000" }));
            [v.ci95[0], v.ci95[1]].forEach(function (e) { s.appendChild(svg("line", { x1: X(e), x2: X(e), y1: y + 5, y2: y + rowH - 5, stroke: "#000" })); });
          }
          y += rowH;
        });
        y += 10;
      });
      return el("div", { class: "chart" }, [s]);
    }
    return LOUPE.load("eval", served).then(function (data) {
      render(data);
      if (served && !data.complete) timers.push(setInterval(function () {
        LOUPE.load("eval", true).then(function (d) { if (d.updated !== data.updated) { data = d; render(d); } }).catch(function () {});
      }, 5000));
    });
  }
})();
