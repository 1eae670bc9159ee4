// The routing explorer's only script: hover text for every [data-tip] element, and the token box.
// Hand-written and inline (no library, no network): see README, "One HTML file of a run".
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var tooltip = document.getElementById("tooltip");

  document.addEventListener("mouseover", function (event) {
    var element = event.target.closest("[data-tip]");
    if (!element) {
      tooltip.hidden = true;
      return;
    }
    tooltip.textContent = element.getAttribute("data-tip");
    tooltip.hidden = false;
  });
  document.addEventListener("mousemove", function (event) {
    tooltip.style.left = event.pageX + 14 + "px";
    tooltip.style.top = event.pageY + 14 + "px";
  });

  function choices(pairs, prefix) {
    // [[node, weight], ...] -> "h0 1.000 · h2 0.537"
    if (!pairs.length) return "none";
    return pairs.map(function (pair) { return prefix + pair[0] + " " + pair[1].toFixed(3); }).join(" \u00b7 ");
  }

  function cell(tag, text, className) {
    var element = document.createElement(tag);
    element.textContent = text;
    if (className) element.className = className;
    return element;
  }

  var detail = document.getElementById("token-detail");
  var selected = null;

  function showToken(span) {
    var token = data.tokens[Number(span.getAttribute("data-index"))];
    if (selected) selected.classList.remove("selected");
    selected = span;
    span.classList.add("selected");
    var table = document.createElement("table");
    var head = document.createElement("tr");
    head.appendChild(cell("th", "layer"));
    head.appendChild(cell("th", "heads (gate)"));
    if (data.has_experts) head.appendChild(cell("th", "experts (weight)"));
    table.appendChild(head);
    token.layers.forEach(function (layer, index) {
      var row = document.createElement("tr");
      row.setAttribute("data-layer", String(index));
      row.appendChild(cell("th", "layer " + index));
      row.appendChild(cell("td", choices(layer.heads, "h"), "heads"));
      if (data.has_experts) row.appendChild(cell("td", choices(layer.experts || [], "e"), "experts"));
      table.appendChild(row);
    });
    detail.replaceChildren(cell("div", "token " + Number(span.getAttribute("data-index")) + ": " +
                                       JSON.stringify(token.label) + " (id " + token.id + ")", "token-title"), table);
  }

  document.querySelectorAll("#text-box .token").forEach(function (span) {
    span.addEventListener("mouseenter", function () { showToken(span); });
  });
})();
