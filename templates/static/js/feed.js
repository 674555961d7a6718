// The hospital's live feed, shared by every page that updates itself: connect to /ws/events/,
// subscribe, show the state in #live, reconnect with backoff, stop for good when access ends.
// The socket only says "something changed"; each page fetches what it shows, and `onSubscribed`
// runs after every (re)connection so a page that was offline catches up: the database is the truth.
window.SightlineFeed = function (tenant, handlers) {
  "use strict";
  var indicator = document.getElementById("live");
  var delay = 500;

  function setState(state, text) {
    if (!indicator) return;
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + "/ws/events/");
    socket.onopen = function () {
      delay = 500;
      socket.send(JSON.stringify({type: "subscribe", tenant: tenant}));
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "subscribed") {
        setState("live", "live");
        if (handlers.onSubscribed) handlers.onSubscribed();
      } else if (handlers[message.type]) {
        handlers[message.type](message);
      }
    };
    socket.onclose = function (event) {
      if (event.code === 4401 || event.code === 4403) {
        setState("offline", "signed out — reload the page");
        return;
      }
      setState("offline", "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    };
  }

  connect();
};
