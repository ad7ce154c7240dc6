-- Argo CD health of a CoTrainJob (cotrain.dev/v1alpha1), read from the status the CoTrain
-- operator writes: phase, conditions (metav1.Condition) and observedGeneration.
-- Argo CD runs it with gopher-lua (Lua 5.1); argocd-cm.yaml carries the same text.
--
--   no status yet, Pending, Running      -> Progressing
--   status older than the spec           -> Progressing (the operator has not caught up)
--   Succeeded                            -> Healthy
--   Failed                               -> Degraded, with the Failed condition's message
--   Suspended (spec.runPolicy.suspend)   -> Suspended, e.g. while Kueue holds it in a queue
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message_of(status, kind, fallback)
  local c = condition(status, kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the CoTrain operator to pick up the job"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
local stale = generation ~= nil and observed ~= nil and observed < generation
local phase = status.phase

-- A finished job stays finished whatever is edited later, except a spec the operator refused
-- (InvalidSpec), which it checks again once the spec changes.
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of(status, "Succeeded", "The job succeeded")
  return hs
end

if phase == "Failed" then
  local failed = condition(status, "Failed")
  if stale and failed ~= nil and failed.reason == "InvalidSpec" then
    hs.status = "Progressing"
    hs.message = "The spec changed since it was refused; waiting for the operator to check generation "
      .. tostring(generation)
    return hs
  end
  hs.status = "Degraded"
  hs.message = message_of(status, "Failed", "The job failed")
  return hs
end

if stale then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    .. " (status is from generation " .. tostring(observed) .. ")"
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(status, "Suspended", "The job is suspended")
  return hs
end

if phase == "Pending" then
  hs.status = "Progressing"
  local schedulable = condition(status, "Schedulable")
  if schedulable ~= nil and schedulable.status == "False" then
    -- No node fits yet: like a Pending pod, this waits for capacity rather than failing.
    hs.message = "Unschedulable: " .. tostring(schedulable.message)
  else
    hs.message = "Waiting for the job's pods to start"
  end
  return hs
end

if phase == "Running" then
  hs.status = "Progressing"
  local parts = {}
  if status.readyMembers ~= nil then
    table.insert(parts, tostring(status.readyMembers) .. " members ready")
  end
  if status.progress ~= nil then
    table.insert(parts, tostring(status.progress) .. " done")
  end
  if #parts == 0 then
    hs.message = "Training"
  else
    hs.message = "Training: " .. table.concat(parts, ", ")
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
