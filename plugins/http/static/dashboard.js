// The overview chart (uPlot) and the blocking countdown; the rest of the page is plain
// HTML with htmx attributes.
(function () {
  "use strict";

  function drawChart(el) {
    fetch(el.dataset.src, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (c) {
        var series = [
          { label: "time" },
          { label: "queries", stroke: "#2b6cb0", fill: "rgba(43,108,176,0.12)", width: 2 },
          { label: "blocked", stroke: "#c53030", width: 2 },
          { label: "cached", stroke: "#2f855a", width: 2 },
          { label: "forwarded", stroke: "#b7791f", width: 2 },
        ];
        var data = [c.time, c.queries, c.blocked, c.cached, c.forwarded];
        var width = Math.max(280, el.clientWidth || 600);
        el.innerHTML = "";
        var plot = new uPlot({ width: width, height: 240, series: series,
          scales: { x: { time: true } }, axes: [{}, { size: 50 }] }, data, el);
        el.dataset.points = String(c.time.length);
        el.dataset.queries = String(c.queries.reduce(function (a, b) { return a + b; }, 0));
        window.addEventListener("resize", function () {
          plot.setSize({ width: Math.max(280, el.clientWidth), height: 240 });
        });
      });
  }

  function tick() {
    var el = document.getElementById("countdown");
    if (!el) return;
    var left = Math.max(0, parseFloat(el.dataset.left) - 1);
    el.dataset.left = String(left);
    var s = Math.floor(left);
    el.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  document.addEventListener("DOMContentLoaded", function () {
    var chart = document.getElementById("chart");
    if (chart && window.uPlot) drawChart(chart);
    setInterval(tick, 1000);
  });
})();
