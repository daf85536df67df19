-- wrk script of the OpenAI-shaped scenario (../openai.sh): every request is a
-- POST /v1/chat/completions with a small OpenAI chat body, alternately for
-- model m1 and model m2 (50/50). The two requests are formatted once, at start.
local bodies = {
  '{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":16}',
  '{"model":"m2","messages":[{"role":"user","content":"hi"}],"max_tokens":16}',
}
local reqs = {}
local n = 0

init = function(args)
  for i, b in ipairs(bodies) do
    reqs[i] = wrk.format("POST", "/v1/chat/completions", { ["Content-Type"] = "application/json" }, b)
  end
end

request = function()
  n = n + 1
  return reqs[n % 2 + 1]
end
