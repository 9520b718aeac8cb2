// ESN listening kit: blind A/B preference and emotion labelling, from files on disk.
// Trial order and A/B sides are shuffled per listener by a PRNG seeded with (kit, listener),
// so a listener who reloads sees the same order. Answers live in localStorage until exported.
(function () {
  "use strict";
  var KIT = window.ESN_KIT, $ = function (id) { return document.getElementById(id); };
  var listener = "", trials = [], answers = [];

  function seedOf(text) {            // FNV-1a hash of a string -> 32-bit seed
    var h = 2166136261;
    for (var i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    return h;
  }
  function prng(seed) {              // mulberry32
    return function () {
      seed = (seed + 0x6D2B79F5) >>> 0;
      var t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }
  function shuffle(list, rand) {
    var a = list.slice();
    for (var i = a.length - 1; i > 0; i--) { var j = Math.floor(rand() * (i + 1)); var t = a[i]; a[i] = a[j]; a[j] = t; }
    return a;
  }
  function plan(name) {
    var rand = prng(seedOf(KIT.kit + "|" + name)), out = [];
    shuffle(KIT.ab, rand).forEach(function (t) {
      out.push({ task: "ab", item: t.item, emotion: t.emotion, clips: rand() < 0.5 ? t.clips.slice() : t.clips.slice().reverse() });
    });
    shuffle(KIT.label, rand).forEach(function (t) { out.push({ task: "label", item: t.item, clips: t.clips.slice() }); });
    return out;
  }
  function storageKey() { return "esn-kit:" + KIT.kit + ":" + listener; }
  function save() {
    try { localStorage.setItem(storageKey(), JSON.stringify(answers)); $("saved").textContent = "saved in this browser"; }
    catch (e) { $("saved").textContent = "not saved in this browser (" + e.name + "): download before closing"; }
  }
  function button(text, answer) {
    var b = document.createElement("button");
    b.textContent = text; b.dataset.answer = answer;
    b.addEventListener("click", function () { answer_(answer); });
    return b;
  }
  function player(label, clip) {
    var d = document.createElement("div"), a = document.createElement("audio");
    d.className = "player"; d.textContent = label;
    a.controls = true; a.preload = "auto"; a.src = "clips/" + clip + ".wav";
    d.appendChild(a); return d;
  }
  function show() {
    var n = answers.length, total = trials.length;
    $("export").disabled = n === 0;
    $("bar").max = total; $("bar").value = n;
    if (n >= total) { $("test").hidden = true; $("done").hidden = false; return; }
    var t = trials[n], players = $("players"), buttons = $("answers");
    players.innerHTML = ""; buttons.innerHTML = "";
    $("progress").textContent = (t.task === "ab" ? "Part 1" : "Part 2") + " \u2014 trial " + (n + 1) + " of " + total;
    if (t.task === "ab") {
      $("question").textContent = "Which clip conveys the emotion \u201c" + t.emotion + "\u201d better?";
      players.appendChild(player("A", t.clips[0])); players.appendChild(player("B", t.clips[1]));
      KIT.ab_answers.forEach(function (a) { buttons.appendChild(button(a, a)); });
    } else {
      $("question").textContent = "Which emotion do you hear?";
      players.appendChild(player("", t.clips[0]));
      KIT.labels.forEach(function (a) { buttons.appendChild(button(a, a)); });
    }
  }
  function answer_(value) {
    var t = trials[answers.length];
    answers.push({ task: t.task, item: t.item, clip_a: t.clips[0], clip_b: t.clips[1] || "", answer: value });
    save(); show();
  }
  function csvCell(v) { v = String(v); return /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  function exportCsv() {
    var lines = [KIT.columns.join(",")];
    answers.forEach(function (a, i) {
      var row = { kit: KIT.kit, listener: listener, task: a.task, trial: i + 1, item: a.item,
                  clip_a: a.clip_a, clip_b: a.clip_b, answer: a.answer };
      lines.push(KIT.columns.map(function (c) { return csvCell(row[c]); }).join(","));
    });
    var blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" }), link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = listener.replace(/[^A-Za-z0-9_-]+/g, "_") + "_" + KIT.kit + ".csv";
    document.body.appendChild(link); link.click(); link.remove();
  }
  function start() {
    listener = $("listener").value.trim();
    if (!listener) { $("listener").focus(); return; }
    trials = plan(listener);
    try { answers = JSON.parse(localStorage.getItem(storageKey()) || "[]"); } catch (e) { answers = []; }
    $("welcome").hidden = true; $("test").hidden = false;
    show();
  }
  $("title").textContent = KIT.title;
  $("start").addEventListener("click", start);
  $("listener").addEventListener("keydown", function (e) { if (e.key === "Enter") start(); });
  $("export").addEventListener("click", exportCsv);
})();
